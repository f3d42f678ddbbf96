"""The exact GQA -> MLA construction on the real SmolLM2-135M-Instruct: same greedy answer, token for token.

    python examples/lossless_smollm2.py            # about 1-2 minutes on a 2-core CPU

Converts the embedded GGUF model with --kv-ratio 1.0 (all key dims keep RoPE, full-rank latent),
then greedy-generates 32 tokens for a chat prompt with the original and the converted model.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from mla_retrofit.convert.pipeline import ConvertConfig, convert
from mla_retrofit.sources import EMBEDDED_DEFAULT, load_model, resolve


def main() -> int:
    t0 = time.time()
    source = resolve(EMBEDDED_DEFAULT)
    tok = source.tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "mla-lossless"
        convert(ConvertConfig(model=EMBEDDED_DEFAULT, output=str(out), kv_ratio=1.0, calib_samples=2,
                              calib_seq_len=64, eval_samples=1, eval_seq_len=32), source=source)
        orig, mla = load_model(EMBEDDED_DEFAULT), load_model(str(out))
        msgs = [{"role": "user", "content": "Explain in two sentences what a key-value cache is."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            a = orig.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
            b = mla.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
            la, lb = orig(ids).logits, mla(ids).logits
    rel = float((la - lb).abs().max() / la.abs().max())
    print(f"original : {tok.decode(a)!r}")
    print(f"MLA exact: {tok.decode(b)!r}")
    print(f"same 32 tokens: {torch.equal(a, b)}; max relative logit error {rel:.2e}; {time.time() - t0:.0f} s")
    return 0 if torch.equal(a, b) and rel <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
