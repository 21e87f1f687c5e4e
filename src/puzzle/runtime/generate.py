"""`generate`: prompts in, tokens out, streamed step by step through a callback."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from puzzle.core.errors import PuzzleError
from puzzle.model.decoder import PuzzleModel
from puzzle.runtime.decode_attention import DecodeAttention
from puzzle.runtime.engine import Engine, GraphMode, left_pad
from puzzle.runtime.sampling import SamplingConfig, sample

# on_token(step, tokens [B] as a list, finished [B] flags after this token)
TokenCallback = Callable[[int, list[int], list[bool]], None]


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per prompt, without the stop token
    finish_reasons: list[str]  # "stop" or "length"
    ttft_s: float = 0.0  # prefill + first token
    step_times_s: list[float] = field(default_factory=list)  # wall time of each later token

    @property
    def inter_token_s(self) -> float:
        return sum(self.step_times_s) / len(self.step_times_s) if self.step_times_s else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_prompts(model: PuzzleModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    cfg = model.config
    if max_new_tokens <= 0:
        raise PuzzleError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if not prompts:
        raise PuzzleError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise PuzzleError(f"prompt {i} is empty; give at least one token (e.g. BOS)")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise PuzzleError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise PuzzleError(
                f"prompt {i} ({len(p)} tokens) + {max_new_tokens} new tokens exceeds the model's context of "
                f"{cfg.max_position_embeddings}; shorten the prompt or lower max_new_tokens"
            )
        out.append(p)
    return out


@torch.inference_mode()
def generate(model: PuzzleModel, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
             sampling: SamplingConfig | None = None, stop_tokens: Sequence[int] = (), seed: int | None = None,
             on_token: TokenCallback | None = None, graphs: GraphMode = "auto",
             engine: Engine | None = None, kv_dtype: torch.dtype | None = None,
             decode_attention: DecodeAttention = "auto") -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt (batched, left-padded); stops a row at a stop token.

    `engine` may be passed to reuse its cache (and captured graphs) across calls of the same batch size.
    kv_dtype: the KV cache's storage when the engine is built here (torch.float8_e4m3fn: FP8, see `Engine`);
    decode_attention: its decode attention ("auto", "triton", "sdpa": see `Engine`).
    """
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    rows = check_prompts(model, prompts, max_new_tokens)
    sampling = sampling or SamplingConfig()
    ids, pads = left_pad(rows)
    b, p = ids.shape
    if engine is None:
        engine = Engine(model, b, p + max_new_tokens, graphs=graphs, kv_dtype=kv_dtype,
                        decode_attention=decode_attention)
    elif engine.batch_size != b or engine.max_seq_len < p + max_new_tokens:
        raise PuzzleError("the given engine's batch size or length does not fit these prompts")
    device = engine.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    step_times: list[float] = []

    t0 = time.perf_counter()
    logits = engine.prefill(ids, pads)
    for step in range(max_new_tokens):
        token = sample(logits, sampling, gen)  # [B]
        hit = torch.isin(token, stops) if len(stops) else torch.zeros_like(finished)
        new_finished = finished | hit
        tokens_host, hit_host, done_host = token.tolist(), hit.tolist(), new_finished.tolist()
        was_finished = finished.tolist()
        for i in range(b):
            if was_finished[i]:
                continue
            if hit_host[i]:
                reasons[i] = "stop"
            else:
                out[i].append(tokens_host[i])
        finished = new_finished
        now = time.perf_counter()
        if step == 0:
            ttft = now - t0
        else:
            step_times.append(now - t0)
        t0 = now
        if on_token is not None:
            on_token(step, tokens_host, done_host)
        if all(done_host) or step == max_new_tokens - 1:
            break
        logits = engine.decode(token)
    _sync(device)
    return GenerationResult(out, reasons, ttft, step_times)
