"""Engine form against the native model, for a tiny random model of every family (KL per token, top-1).

    python benchmarks/engine_form_families.py

Each family (the test suite's tiny models: Llama, Llama-3 with tied embeddings, Qwen2 with q/k/v biases,
Mistral) is converted at 50% KV with the exportable layout, centred (the default) and with --no-centre,
exported with ``engine=True``, loaded by stock transformers in float64 and compared with the native model on
the same 48 tokens. Prints one JSON line per case. (Qwen3 is refused by the export.)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    from tiny import save_tiny, tiny_tokenizer
    from transformers import DeepseekV3ForCausalLM

    from mla_retrofit.convert.pipeline import ConvertConfig, convert
    from mla_retrofit.export import export_deepseek
    from mla_retrofit.export.verify import compare_logits
    from mla_retrofit.sources import load_model

    torch.set_num_threads(2)
    ids = tiny_tokenizer()("The quick brown fox jumps over the lazy dog while the json module parses. " * 3,
                           return_tensors="pt")["input_ids"][:, :48]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in ("llama", "llama3", "qwen2", "mistral"):
            src = save_tiny(family, root / family)
            for centre in (True, False):
                native = root / f"{family}-{centre}"
                convert(ConvertConfig(model=str(src), output=str(native), kv_ratio=0.5, calib_samples=8,
                                      calib_seq_len=96, eval_samples=2, eval_seq_len=64, rope_layout="deepseek",
                                      rank_allocation="uniform", centre=centre))
                rep = export_deepseek(str(native), str(root / f"{family}-{centre}-engine"), engine=True)
                ds = DeepseekV3ForCausalLM.from_pretrained(str(root / f"{family}-{centre}-engine"),
                                                           dtype=torch.float64).eval()
                with torch.no_grad():
                    ref = load_model(str(native)).double()(ids).logits[0]
                    got = ds(ids).logits[0]
                cmp = compare_logits(ref, got)
                print(json.dumps({"family": family, "centre": centre, "exact": rep.exact,
                                  "dropped_biases": sorted(rep.dropped_biases), "kl_mean": cmp["kl_mean"],
                                  "kl_max": cmp["kl_max"], "top1_agreement": cmp["top1_agreement"]}), flush=True)


if __name__ == "__main__":
    main()
