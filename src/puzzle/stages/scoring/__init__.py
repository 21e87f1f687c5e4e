"""`puzzle score`: replace-1-block scoring (`score`), its evaluation batches (`batches`) and the stage runner
(`stage`)."""
