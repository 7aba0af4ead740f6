"""The local backend on a GPU: neurons per second at 1, 8 and 32 concurrent neurons, on a randomly initialised
model of Llama-3.1-8B's shape (nothing downloaded: the config is written below, the weights are random bf16).

A "neuron" is what bench/local_batching.py issues: one greedy explanation over 10 train excerpts of 64 tokens,
then its 10 test excerpts simulated three times (explanation, neutral, shuffled partner), from a thread of its
own. A random model rarely writes a newline, so its explanations run to the 64-token limit: the generation
part is the worst case. Prints JSON lines: the setup, a bare prefill reference, then one line per
concurrency.

The tokenizer comes from a packaged model whose ids all fit the model's 128,256-row embedding (SmolLM2's,
49,152 ids; Qwen's 151,936 do not). The GPU machine has no packaged weights, so save the tokenizer here first
and carry the folder:

    python bench/gpu_local.py --save-tokenizer .gpu_tokenizer     # here, once (SmolLM2's tokenizer files)
    python bench/gpu_local.py --tokenizer .gpu_tokenizer          # there: one command, about 3-5 minutes
    python bench/gpu_local.py --tiny --tokenizer .gpu_tokenizer   # a tiny shape on the CPU, to check the script

It runs from a plain checkout too (no `pip install`): neuronscope is made importable from the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import LLAMA_31_8B, TINY, build_model, make_importable  # noqa: E402


def save_tokenizer(folder: Path, model: str) -> None:
    """Write a packaged model's tokenizer files to a folder (from its safetensors cache, else by loading it)."""
    from transformers import AutoTokenizer

    from neuronscope.core.models.packaged import PACKAGED, cache_dir

    cached = cache_dir() / "subjects" / PACKAGED[model].sha256[:16]
    if (cached / "tokenizer.json").exists() or (cached / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        from neuronscope.core.models.loading import load_subject

        tokenizer = load_subject(model, device="cpu").tokenizer
    tokenizer.save_pretrained(folder)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(json.dumps({"saved_tokenizer": str(folder), "model": model, "ids": len(tokenizer), "bytes": size}))


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_reference(backend: Any, width: int) -> dict[str, Any]:
    """Tokens per second of one bare forward pass of a full batch (budget-sized: rows x width), as the backend's
    forward batches run it: what the simulation part could reach at best."""
    import torch

    lm = backend.lm
    rows = max(1, backend.batch_tokens // width)
    ids = torch.randint(100, 40_000, (rows, width), device=lm.device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        lm.model.base_model(input_ids=ids, attention_mask=mask)  # warm-up
        sync(lm.device)
        start = time.perf_counter()
        for _ in range(3):
            lm.model.base_model(input_ids=ids, attention_mask=mask)
        sync(lm.device)
    seconds = (time.perf_counter() - start) / 3
    return {"reference": "bare forward", "rows": rows, "width": width, "tokens_per_s": round(rows * width / seconds)}


def measure(backend: Any, neurons: list[Any], threads: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from local_batching import CountingLog, neuron_work

    log = CountingLog()
    backend.bind(log)
    history_at, batches_at = len(backend.batcher.history), backend.batches_run
    sync(backend.lm.device)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda n: neuron_work(backend, n), neurons))
    sync(backend.lm.device)
    seconds = time.perf_counter() - start
    history = backend.batcher.history[history_at:]

    def rows(group: str) -> float:
        sizes = [b.rows for b in history if b.group == group]
        return round(sum(sizes) / len(sizes), 2) if sizes else 0.0

    return {"concurrency": threads, "neurons": len(neurons), "seconds": round(seconds, 2),
            "neurons_per_s": round(len(neurons) / seconds, 3), "batches": backend.batches_run - batches_at,
            "explain_rows_per_batch": rows("greedy"), "forward_rows_per_batch": rows("forward"),
            "largest_batch_tokens": max((b.tokens for b in history), default=0),
            "tokens_per_s": round(log.used_tokens / seconds), "generated_per_explanation":
                round(log.generated / max(1, log.explains), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same vocabulary, fp32 on the CPU")
    parser.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parent.parent / ".gpu_tokenizer",
                        help="tokenizer folder")
    parser.add_argument("--save-tokenizer", type=Path, default=None, metavar="FOLDER",
                        help="write the packaged model's tokenizer to FOLDER and stop")
    parser.add_argument("--tokenizer-model", default="smollm2-135m", help="packaged model whose tokenizer to save")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--neurons", type=int, default=0, help="neurons per concurrency (default max(8, 2 x it))")
    parser.add_argument("--batch-tokens", type=int, default=None, help="the backend's token budget per batch")
    parser.add_argument("--max-seconds", type=float, default=400.0, help="skip the levels left after this long")
    args = parser.parse_args()
    make_importable()
    if args.save_tokenizer:
        save_tokenizer(args.save_tokenizer, args.tokenizer_model)
        return

    import torch
    from local_batching import CountingLog, make_neurons, neuron_work
    from transformers import AutoTokenizer

    from neuronscope.core.llm.local import LocalBackend
    from neuronscope.core.models.subject import Subject

    began = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = TINY if args.tiny else LLAMA_31_8B
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tokenizer) > config["vocab_size"]:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} ids, more than the model's {config['vocab_size']} rows")
    model = build_model(config, device, dtype)
    sync(device)
    built = time.perf_counter() - began
    subject = Subject(model, tokenizer, name="random llama-3.1-8b shape" + (" (tiny)" if args.tiny else ""),
                      revision="random-init-0", device=device, dtype=dtype)
    backend = LocalBackend.from_subject(subject, spec="local:random-llama-3.1-8b")
    if args.batch_tokens:
        backend.batch_tokens = args.batch_tokens
    biggest = max(args.concurrency)
    count = args.neurons or max(8, 2 * biggest)
    neurons = make_neurons(tokenizer, count, vocab_limit=config["vocab_size"])
    from neuronscope.core.llm.prompts import explain_prompt

    prompt = explain_prompt(neurons[0].train, backend.count_tokens, backend.context_tokens())
    sim_ids = sum(len(p.ids) for p in backend._simulation_prompts(neurons[0].partner, neurons[0].test))
    setup = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "dtype": str(dtype).removeprefix("torch."), "params": sum(p.numel() for p in model.parameters()),
             "build_s": round(built, 1), "torch": torch.__version__, "tokenizer_ids": len(tokenizer),
             "batch_tokens": backend.batch_tokens, "batch_rows": backend.batch_size,
             "explain_prompt_tokens": backend.count_tokens(prompt.text()), "simulation_prompt_ids": sim_ids}
    print(json.dumps(setup), flush=True)
    print(json.dumps(prefill_reference(backend, sim_ids)), flush=True)
    backend.bind(CountingLog())
    neuron_work(backend, neurons[-1])  # warm-up: kernels, allocator
    for threads in args.concurrency:
        if time.perf_counter() - began > args.max_seconds:
            print(json.dumps({"concurrency": threads, "skipped": f"past --max-seconds {args.max_seconds:.0f}"}))
            continue
        level = neurons[: args.neurons or max(8, 2 * threads)]
        print(json.dumps(measure(backend, level, threads)), flush=True)
    backend.close()
    print(json.dumps({"total_s": round(time.perf_counter() - began, 1)}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
