"""How close a child attention with fewer KV heads starts, and ends after BLD, under each `library.kv_init`.

For chosen layers of a parent, trains the fewer-KV-head variants (and linear attention, for scale) with the
library's own `train_wave`, once per init, and records each variant's validation nMSE before and after
training (nMSE 1 = as far from the parent's attention output as no attention at all). Training text and
validation text come from different files, so "init" is already out of sample.

    python benchmarks/kv_init.py --parent runs/smollm2/parent --layers 3,9,18,27 --kv-heads 1 \
        --text ../shared/data/text/gutenberg --out benchmarks/results/kv_init_smollm2.json

`--tiny` runs a random tiny parent on CPU in seconds (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import lzma
from pathlib import Path

import numpy as np
import torch
from _meta import metadata

from puzzle.core.artifacts import write_json
from puzzle.formats import load_model
from puzzle.formats.tokenizers import load_tokenizer
from puzzle.model.blocks import AttentionConfig
from puzzle.model.decoder import build_model
from puzzle.model.presets import tiny_llama_config
from puzzle.stages.library import LibraryConfig, LibraryEntry
from puzzle.stages.library.train import train_wave


def token_rows(ids: list[int], seq_len: int, rows: int) -> np.ndarray:
    """The first rows x seq_len tokens as [rows, seq_len] (fewer rows when the text is short)."""
    n = min(rows, len(ids) // seq_len)
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def read_text(path: Path) -> str:
    raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    return raw.decode("utf-8", errors="ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parent", help="a model directory puzzle reads (with its tokenizer)")
    ap.add_argument("--text", help="a folder of .txt or .txt.xz files: the first trains, the second validates")
    ap.add_argument("--layers", default="3,9")
    ap.add_argument("--kv-heads", default="1", help="child KV head counts, comma-separated")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--train-rows", type=int, default=256)
    ap.add_argument("--valid-rows", type=int, default=16)
    ap.add_argument("--tokens-per-variant", type=int, default=8 * 256 * 30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.tiny:
        parent = build_model(tiny_llama_config(num_layers=4, hidden_size=64, num_heads=8, num_kv_heads=4), seed=0)
        rng = np.random.default_rng(0)
        train = rng.integers(0, 256, size=(64, 32))
        valid = rng.integers(0, 256, size=(8, 32))
        layers, name = [1, 2], "tiny random parent"
    else:
        parent = load_model(args.parent, device=device)
        tok = load_tokenizer(args.parent)
        files = sorted(p for p in Path(args.text).iterdir() if p.name.endswith((".txt", ".txt.xz")))
        train = token_rows(tok.encode(read_text(files[0])), args.seq_len, args.train_rows)
        valid = token_rows(tok.encode(read_text(files[1])), args.seq_len, args.valid_rows)
        layers, name = [int(x) for x in args.layers.split(",")], str(args.parent)
    parent = parent.to(device).float().eval()
    kv_counts = [int(x) for x in args.kv_heads.split(",")]
    items = [LibraryEntry(layer, "attention", AttentionConfig.gqa(kv), None, None) for layer in layers for kv in kv_counts]
    items += [LibraryEntry(layer, "attention", AttentionConfig.linear(), None, None) for layer in layers]
    rows: list[dict[str, object]] = []
    for kv_init in ("mean", "pca"):
        cfg = LibraryConfig(tokens_per_variant=args.tokens_per_variant, batch_size=args.batch_size, kv_init=kv_init,
                            init_batches=4, valid_batches=max(1, len(valid) // args.batch_size), progress=False)
        result = train_wave(parent, items, train, valid, cfg, device, torch.float32, "kv-init", kv_init, 0)
        for entry, _ in result.done:
            if kv_init == "pca" and entry.attention.kind == "linear":
                continue  # linear attention does not depend on kv_init: one row is enough
            rows.append({"layer": entry.layer, "variant": entry.variant, "kv_init": kv_init if entry.attention.kind
                         == "gqa" else "-", "val_nmse_init": entry.metrics["val_nmse_init"],
                         "val_nmse_after": entry.metrics["val_nmse_after"], "tokens": entry.metrics["tokens"]})
    rows.sort(key=lambda r: (r["layer"], r["variant"], r["kv_init"]))
    print(f"{'layer':>5} {'variant':>8} {'kv_init':>7} {'nMSE init':>9} {'after':>7}")
    for r in rows:
        print(f"{r['layer']:>5} {r['variant']:>8} {r['kv_init']:>7} {r['val_nmse_init']:>9.3f} {r['val_nmse_after']:>7.3f}")
    write_json(Path(args.out), {"benchmark": "kv_init", "parent": name, "layers": layers, "kv_heads": kv_counts,
                                "train_tokens": int(train.size), "valid_tokens": int(valid.size),
                                "tokens_per_variant": args.tokens_per_variant, "rows": rows, "meta": metadata()})


if __name__ == "__main__":
    main()
