"""Where a compressed model loses its quality: perplexity with some modules given back.

Loads a rankcut checkpoint and its dense model, measures the checkpoint's perplexity (the
README protocol: the first ``--max-windows`` 2048-token windows of the wiki test text),
then, for every ``--restore`` group, the perplexity of a copy whose named modules are the
dense model's again (each group alone, the others kept compressed), with the parameters it
gives back. A group whose return lowers the perplexity most is where the cut costs most.

Before it, one 512-token window of the test text through the dense model gives the norm of
the first token's hidden state (the attention sink's) and the median of the others' after
the embeddings and after every block (transformers' ``output_hidden_states``: the last is
after the final norm), which shows where the sink's massive activation appears.

    .venv/bin/python benchmarks/restore_modules.py --checkpoint DIR \
        --restore "model.layers.11.mlp.*" "model.layers.10.mlp.*" model.layers.11.mlp.down_proj

Writes JSON (default ``bench-out/restore_modules.json``).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
from pathlib import Path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a rankcut checkpoint folder")
    p.add_argument("--model", default="smollm2", help="its dense model")
    p.add_argument("--restore", nargs="+", default=[],
                   help="groups of low-rank module names or globs (fnmatch), "
                        "comma-separated within a group")
    p.add_argument("--max-windows", type=int, default=20)
    p.add_argument("--output", default="bench-out/restore_modules.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    import torch

    import rankcut
    from rankcut.architecture import text_tokenizer
    from rankcut.calibration import data
    from rankcut.nn.modules import LowRankLinear

    dense, processor = rankcut.load_model(args.model)
    compressed = rankcut.from_pretrained(args.checkpoint)
    low_rank = [n for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)]
    groups = []
    for group in args.restore:
        groups.append([n for n in low_rank if any(fnmatch.fnmatchcase(n, pattern)
                                                  for pattern in group.split(","))])
        if not groups[-1]:
            raise SystemExit(f"--restore {group!r} names no low-rank module of the checkpoint")
    test = data.eval_token_ids(text_tokenizer(processor), data.load_text("wiki", "test"))
    with torch.no_grad():
        states = dense(test[:512][None], output_hidden_states=True).hidden_states
    sink = [float(h[0, 0].norm()) for h in states]
    others = [float(h[0, 1:].norm(dim=-1).median()) for h in states]

    def perplexity(model) -> float:
        return rankcut.evaluate(model, test, seqlen=2048,
                                max_windows=args.max_windows).perplexity

    rows = [{"restored": [], "params_back": 0, "perplexity": perplexity(compressed)}]
    for names in groups:
        model = copy.deepcopy(compressed)
        back = 0
        for name in names:
            original = dense.get_submodule(name)
            back += (sum(p.numel() for p in original.parameters())
                     - sum(p.numel() for p in model.get_submodule(name).parameters()))
            model.set_submodule(name, copy.deepcopy(original))
        rows.append({"restored": names, "params_back": back, "perplexity": perplexity(model)})
        del model

    print(f"{'after':>8} {'sink norm':>10} {'median other':>12}")  # 0: the embeddings
    for index, (s, o) in enumerate(zip(sink, others, strict=True)):
        print(f"{index - 1 if index else 'embed':>8} {s:>10.1f} {o:>12.1f}")
    base = rows[0]["perplexity"]
    print(f"\n{'restored':<60} {'params back':>12} {'perplexity':>11} {'change':>7}")
    for row in rows:
        label = ", ".join(row["restored"]) or "(none: the checkpoint)"
        print(f"{label[:60]:<60} {row['params_back']:>12,} {row['perplexity']:>11.2f} "
              f"{row['perplexity'] / base - 1:>+7.1%}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "model": args.model,
                               "max_windows": args.max_windows,
                               "hidden_norms": {"sink": sink, "median_other": others},
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
