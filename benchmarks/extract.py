"""Cost of the router capture hooks, and trace size per million tokens.

    .venv/bin/python benchmarks/extract.py --repeats 16 --batch 4 --seq-len 128 --threads 1

For the tiny-mixtral preset and a ~100M-parameter Mixtral config (random init, CPU): the median
of `--repeats` timings of a forward pass (base model, no lm_head) without hooks and with `RouterCapture` (hooks +
`pop`, which moves the ids to CPU and drops padding), interleaved, alternating which goes first, so both
see the same machine load;
and the bytes of a saved trace (float16 weights) per million tokens. Prints a Markdown table and
logs every number to MLflow (experiment `benchmarks`, run `extract`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moetuner.extraction.capture import RouterCapture
from moetuner.extraction.extract import Batch, ExtractSpec, empty_trace, route_batch
from moetuner.extraction.presets import build_model
from moetuner.trace import save_trace
from moetuner.tracking import tracked_run

MIXTRAL_100M = dict(num_hidden_layers=6, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                    num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)


def models() -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    return {"tiny-mixtral": build_model("tiny-mixtral"),
            "mixtral-100m": AutoModelForCausalLM.from_config(MixtralConfig(**MIXTRAL_100M)).eval()}


@torch.no_grad()
def timed_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, capture: RouterCapture | None
                  ) -> float:
    start = time.perf_counter()
    model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    if capture is not None:
        capture.pop(mask)
    return time.perf_counter() - start


def measure(model: torch.nn.Module, batch: int, seq_len: int, repeats: int) -> dict[str, float]:
    """Median forward seconds without and with hooks, and trace bytes per million tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    times: dict[bool, list[float]] = {False: [], True: []}
    with RouterCapture(model) as capture:
        timed_forward(model, ids, mask, capture)  # warm-up
        for r in range(repeats):
            for hooked in (r % 2 == 0, r % 2 == 1):  # alternate which variant goes first
                if hooked:
                    times[True].append(timed_forward(model, ids, mask, capture))
                else:
                    capture.__exit__()  # hooks off for the plain forward
                    times[False].append(timed_forward(model, ids, mask, None))
                    capture.__enter__()
        shard = route_batch(model, capture, Batch(0, list(range(batch)), ids.tolist()), 0,
                            empty_trace(model, "bench", "random"), ExtractSpec().weights)
    with tempfile.TemporaryDirectory() as tmp:
        size = save_trace(shard, Path(tmp) / "t.safetensors").stat().st_size
    tokens = batch * seq_len
    t_plain, t_hooked = statistics.median(times[False]), statistics.median(times[True])
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "tokens_per_s_plain": tokens / t_plain, "tokens_per_s_hooked": tokens / t_hooked,
            "hook_overhead_pct": 100 * (t_hooked - t_plain) / t_plain,
            "trace_mb_per_m_tokens": size / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per variant (default 5)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = {**vars(args), "mlflow": {"experiment": "benchmarks"}}
    with tracked_run("extract", config, tags={"benchmark": "extract"}) as run:
        print("| model | params (M) | tokens/s no hooks | tokens/s hooks | hook overhead | trace MB / M tokens |")
        print("|---|---|---|---|---|---|")
        for name, model in tqdm(models().items(), desc="models"):
            row = measure(model, args.batch, args.seq_len, args.repeats)
            run.log_metrics({f"{name}.{k}": v for k, v in row.items()})
            print(f"| {name} | {row['params_m']:.1f} | {row['tokens_per_s_plain']:.0f} | "
                  f"{row['tokens_per_s_hooked']:.0f} | {row['hook_overhead_pct']:+.1f}% | "
                  f"{row['trace_mb_per_m_tokens']:.1f} |")


if __name__ == "__main__":
    main()
