"""Load time and generation speed of the default text model (offline SmolLM2-135M-Instruct).

In one run, on the same process and threads:

* load: the packaged GGUF straight through ``transformers`` (dequantised on every load) against
  the converted safetensors cache that MuseSpark actually loads. If the cache folder is empty the
  one-time conversion is timed too.
* speed: ``--prompts`` chats answered one at a time with ``generate`` against the same chats in
  one left-padded ``generate_batch``, alternating, ``--repeats`` rounds after a warm-up. Tokens
  per second counts generated tokens only (prompt processing is included in the time).

    .venv/bin/python bench/text_tokens_per_second.py --max-new-tokens 64 --repeats 2

Limits: CPU timings move with whatever else the machine runs; compare the ratios of one run,
not numbers across runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from workers.pipelines import text_causal_lm  # noqa: E402
from workers.pipelines.text_causal_lm import (  # noqa: E402
    DEFAULT_CACHE_NAME,
    DEFAULT_GGUF_FILE,
    load_text_generator,
)

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how rain forms, step by step, for a curious ten-year-old.",
    "Describe a busy market in an old town on a summer morning.",
    "Give me ten ideas for a birthday party in the garden, with a sentence about each.",
    "Write a letter from a cat to its owner about the new sofa.",
    "Describe the view from the top of a mountain at sunrise.",
    "Tell me about the history of the bicycle in a few paragraphs.",
    "Write a poem about autumn leaves and the first frost.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="model cache folder (default: a fresh temporary folder, so the "
                        "one-time conversion is timed too)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4, help="chats per round (batch size)")
    parser.add_argument("--repeats", type=int, default=2, help="measured rounds of each mode")
    parser.add_argument("--skip-gguf", action="store_true",
                        help="do not time a direct GGUF load (saves about 20 s)")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be between 1 and {len(PROMPTS)}")

    temp = None
    if args.cache_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="musespark-bench-")
        args.cache_dir = Path(temp.name)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"cache {args.cache_dir}")

    # --- load times ---------------------------------------------------------------------------
    gguf_seconds = None
    if not args.skip_gguf:
        folder, _ = text_causal_lm._find_packaged_gguf()
        start = time.perf_counter()
        AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF_FILE)
        AutoModelForCausalLM.from_pretrained(folder, gguf_file=DEFAULT_GGUF_FILE)
        gguf_seconds = time.perf_counter() - start

    was_cached = (args.cache_dir / DEFAULT_CACHE_NAME).is_dir()
    start = time.perf_counter()
    load_text_generator(None, cache_dir=args.cache_dir, device=args.device)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    generator = load_text_generator(None, cache_dir=args.cache_dir, device=args.device)
    cached_seconds = time.perf_counter() - start

    print("\nload")
    if gguf_seconds is not None:
        print(f"  GGUF via transformers (dequantise) {gguf_seconds:8.2f} s")
    if not was_cached:
        print(f"  first load: convert + load cache   {first_seconds:8.2f} s")
    print(f"  safetensors cache                  {cached_seconds:8.2f} s")
    if gguf_seconds is not None:
        print(f"  cache is {gguf_seconds / cached_seconds:.0f}x faster than GGUF")

    # --- generation speed ---------------------------------------------------------------------
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[: args.prompts]]
    n = args.max_new_tokens
    generator.generate(chats[0], max_new_tokens=8, seed=0)  # warm-up: first call pays setup
    generator.generate_batch(chats, max_new_tokens=8, seed=0)

    single_rates, batch_rates = [], []
    single_tokens = batch_tokens = 0
    for round_ in range(args.repeats):
        start = time.perf_counter()
        tokens = sum(generator.generate(c, max_new_tokens=n, seed=round_).new_tokens
                     for c in chats)
        single_rates.append(tokens / (time.perf_counter() - start))
        single_tokens += tokens

        start = time.perf_counter()
        results = generator.generate_batch(chats, max_new_tokens=n, seed=round_)
        tokens = sum(r.new_tokens for r in results)
        batch_rates.append(tokens / (time.perf_counter() - start))
        batch_tokens += tokens

    single, batch = statistics.median(single_rates), statistics.median(batch_rates)
    print(f"\ngeneration ({args.prompts} chats, up to {n} new tokens each, "
          f"median of {args.repeats} rounds)")
    print(f"  one at a time   {single:8.1f} tokens/s  ({single_tokens} tokens in all)")
    print(f"  batch of {args.prompts:<6} {batch:8.1f} tokens/s  ({batch_tokens} tokens in all)")
    print(f"  batch / single  {batch / single:8.2f}x")
    if temp is not None:
        temp.cleanup()


if __name__ == "__main__":
    main()
