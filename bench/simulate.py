"""One-pass simulation against token-by-token simulation (explanation quality: bench/quality.py).

    python bench/simulate.py speed                    # qwen-1.5b as simulator, 4 neurons of the store
    python bench/simulate.py speed --simulator local:qwen-0.5b --neurons 8

It reads a store holding a SmolLM2 collection (default: ./neuronscope.duckdb, as `neuronscope demo` makes).
Speed: neurons scored per minute (one neuron = its 10 held-out excerpts) by
the one-pass simulator (every slot's digit distribution read from one forward pass) against a token-by-token
simulator on the same model (one cached forward step per token, writing its own digit before the next
line), and how closely the two agree. Ratios are measured in one run; absolute times are noise.
"""

from __future__ import annotations

import argparse
import time


def token_by_token(backend, prompts) -> list[list[float]]:  # type: ignore[no-untyped-def]
    """The slow reference: per excerpt, feed the prompt line by line with a KV cache and read the digit
    distribution after each token's tab, writing the most likely digit before moving on."""
    import torch

    from neuronscope.core.records import TOP

    model, device = backend.lm.model, backend.lm.device
    scale = torch.arange(TOP + 1, dtype=torch.float32)
    out = []
    for p in prompts:  # the same packed prompts as the one-pass simulator reads
        cache = None
        start = 0
        pending: list[int] = []
        with torch.inference_mode():
            for slots in p.slots:
                values: list[float] = []
                for slot in slots:
                    chunk = pending + list(p.ids[start:slot])  # the previous digit, then this line up to the tab
                    result = model(input_ids=torch.tensor([chunk], device=device), past_key_values=cache,
                                   use_cache=True, logits_to_keep=1)
                    cache = result.past_key_values
                    probs = torch.softmax(result.logits[0, -1, backend.digits].float().cpu(), dim=-1)
                    values.append(float(probs @ scale))
                    pending = [backend.digits[int(probs.argmax())]]
                    start = slot + 1  # skip the placeholder: the model's own digit stands in its place
                out.append(values)
    return out


def speed(args: argparse.Namespace) -> None:
    import numpy as np

    from neuronscope.core.explanation.splits import split_records
    from neuronscope.core.llm.base import make_backend
    from neuronscope.core.store import Store

    backend = make_backend(args.simulator, device=args.device)
    with Store.open(args.store, read_only=True) as store:
        run = store.run()
        neurons = store.top_neurons(run.run_id, limit=args.neurons)
        splits = [split_records(store.records(run.run_id, n.layer, n.index, kinds=("top", "bottom", "random")), "pos")
                  for n in neurons]
    explanation = "words about computers and programs, such as code, program and hacker"
    prompts = [backend._simulation_prompts(explanation, [e.tokens for e in s.test]) for s in splits]  # noqa: SLF001
    backend.expected_values(backend._simulation_prompts(explanation, [splits[0].test[0].tokens]))  # noqa: SLF001 warm-up
    started = time.perf_counter()
    one_pass = [backend.expected_values(p) for p in prompts]  # per neuron, per excerpt
    one_pass_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = [token_by_token(backend, p) for p in prompts]
    slow_s = time.perf_counter() - started
    a = np.concatenate([np.concatenate(x) for x in one_pass])
    b = np.concatenate([np.concatenate(x) for x in slow])
    ids = sum(len(q.ids) for p in prompts for q in p)
    tokens = sum(len(v) for x in one_pass for v in x)
    print(f"simulator {args.simulator} on {backend.lm.device}, {len(neurons)} neurons x {len(splits[0].test)} "
          f"excerpts, {tokens:,} tokens simulated, {ids:,} prompt ids in {sum(len(p) for p in prompts)} packed prompts")
    print(f"one-pass:      {len(neurons) / one_pass_s * 60:8.2f} neurons/min")
    print(f"token-by-token:{len(neurons) / slow_s * 60:8.2f} neurons/min")
    print(f"speed-up one-pass / token-by-token: {slow_s / one_pass_s:.1f}x")
    print(f"agreement of the two simulators' expected values: Pearson r {np.corrcoef(a, b)[0, 1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed",))
    parser.add_argument("--store", default="neuronscope.duckdb")
    parser.add_argument("--neurons", type=int, default=4)
    parser.add_argument("--simulator", default="local:qwen-1.5b")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    speed(args)


if __name__ == "__main__":
    main()
