"""transformers' greedy continuation of each fixture conversation on tiny-qwen3 (by hand; needs torch).

Reads the conversations and their rendered prompt ids from tests/fixtures/reference/chat.json
(written by tools/make_fixtures.py) and the bundled checkpoint sidp_jax/assets/tiny-qwen3, and
writes tests/fixtures/reference/tiny-qwen3-chat-greedy.json: per conversation the prompt ids
and transformers' 16 greedy tokens, with the top-2 logit gap at each step (near ties would make
the comparison meaningless, so the engine test can rely on them). Run after make_fixtures.py:

  python tools/make_chat_greedy_fixture.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 16


def greedy(model, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    model.generation_config = GenerationConfig()  # no eos, no sampling defaults from the checkpoint
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0)
        tokens = out[0, len(prompt_ids):].tolist()
        gaps, seq = [], list(prompt_ids)
        for tok in tokens:  # checked by a no-cache loop, as make_fixtures.py does
            last = model(torch.tensor([seq])).logits[0, -1].float()
            top2 = torch.topk(last, 2).values
            gaps.append(float(top2[0] - top2[1]))
            assert int(last.argmax()) == tok, "no-cache greedy disagrees with generate()"
            seq.append(tok)
    return tokens, gaps


def main() -> None:
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    chat = json.loads((ROOT / "tests" / "fixtures" / "reference" / "chat.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(ROOT / "sidp_jax" / "assets" / "tiny-qwen3", dtype=torch.float32)
    model.eval()
    entries = []
    limit = model.config.max_position_embeddings - MAX_NEW_TOKENS
    for conv in chat["conversations"]:
        ids = conv["ids_add_generation_prompt_true"]
        if len(ids) > limit:
            print(f"  {conv['name']}: {len(ids)} prompt tokens, beyond the model's context: left out")
            continue
        tokens, gaps = greedy(model, ids)
        entries.append({"name": conv["name"], "prompt_token_ids": ids, "greedy_token_ids": tokens,
                        "min_top2_gap": min(gaps)})
        print(f"  {conv['name']}: {len(ids)} prompt tokens, min top-2 gap {min(gaps):.4f}")
    out = {"checkpoint": "sidp_jax/assets/tiny-qwen3", "dtype": "float32", "max_new_tokens": MAX_NEW_TOKENS,
           "conversations": entries,
           "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                        "python": sys.version.split()[0]}}
    path = ROOT / "tests" / "fixtures" / "reference" / "tiny-qwen3-chat-greedy.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
