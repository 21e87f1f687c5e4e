"""The opt-in `refine` stage: coupled BLD of the (attention, FFN) pairs the search chose, re-scored and re-searched."""
