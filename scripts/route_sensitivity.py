"""Which quantized matrices move an MoE model's routing: router top-1 agreement with the float model when only one
module of a quantized checkpoint is quantized (``alone``) and when every module but that one is (``restored``).

    python scripts/route_sensitivity.py FLOAT QUANT [--max-tokens 8192] [--seq-len 512] [--threads 2] [--json F]

QUANT must be quantized from FLOAT by a method that changes only the quantized weights (RTN, GPTQ; not AWQ, which
also rescales norms and router columns). Agreement is measured on the first ``--max-tokens`` tokens of ``--data``
(default ``corpus:heldout``), in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def module_weights(model, name: str) -> torch.Tensor:
    """The dense float32 weight of module ``name`` (a linear ``[N, K]`` or an expert stack ``[E, N, K]``)."""
    from qmamba.kernel_view import dense_weight

    parent, _, leaf = name.rpartition(".")
    if leaf in ("fc1", "fc2"):
        experts = model.get_submodule(parent)
        w = getattr(experts, leaf)
        if isinstance(w, torch.Tensor):
            return w.detach().float().clone()
        return torch.stack([experts.expert_weight(leaf, e) for e in range(experts.n_experts)]).float()
    return dense_weight(model.get_submodule(name), torch.float32).float().clone()


def set_weights(model, name: str, w: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    if leaf in ("fc1", "fc2"):
        getattr(model.get_submodule(parent), leaf).data.copy_(w)
    else:
        model.get_submodule(name).weight.data.copy_(w)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("float_ckpt")
    p.add_argument("quant_ckpt")
    p.add_argument("--data", default="corpus:heldout")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qmamba import load_model
    from qmamba.checkpoints.detect import resolve_checkpoint_dir
    from qmamba.eval import encode_text_spec, record_routing, routing_agreement, text_windows
    from qmamba.tokenizer import resolve_tokenizer

    tok = resolve_tokenizer(resolve_checkpoint_dir(args.float_ckpt), None)
    ids = encode_text_spec(tok, args.data, args.max_tokens)
    ids = text_windows(ids, args.seq_len, max(1, args.max_tokens // args.seq_len))
    fp = load_model(args.float_ckpt, device="cpu", dtype=torch.float32)
    q = load_model(args.quant_ckpt, device="cpu", dtype=torch.float32)
    names = list(q.checkpoint_manifest["quantization"])
    float_w = {n: module_weights(fp, n) for n in names}
    quant_w = {n: module_weights(q, n) for n in names}
    del q
    t0 = time.perf_counter()
    ref = record_routing(fp, ids)

    def agreement() -> dict:
        return routing_agreement(ref, record_routing(fp, ids))

    rows = []
    for n in names:  # one module quantized
        set_weights(fp, n, quant_w[n])
        a = agreement()
        set_weights(fp, n, float_w[n])
        rows.append({"module": n, "alone": a["overall"], "alone_per_layer": a["per_layer"]})
    for n in names:  # everything quantized
        set_weights(fp, n, quant_w[n])
    full = agreement()
    for row in rows:  # everything but one module
        n = row["module"]
        set_weights(fp, n, float_w[n])
        row["restored"] = agreement()["overall"]
        set_weights(fp, n, quant_w[n])
    out = {"float": args.float_ckpt, "quant": args.quant_ckpt, "tokens": int(ids.numel()),
           "all_quantized": full["overall"], "all_per_layer": full["per_layer"], "modules": rows,
           "seconds": round(time.perf_counter() - t0, 1)}
    print(f"all quantized: {100 * full['overall']:.2f}% on {ids.numel()} tokens")
    print(f"{'module':34s} {'drop alone':>10s} {'gain restored':>13s}")
    for row in sorted(rows, key=lambda r: r["alone"]):
        print(f"{row['module']:34s} {100 * (1 - row['alone']):9.2f}% {100 * (row['restored'] - full['overall']):12.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
