"""Run every benchmark, print ratio tables and write them as JSON.

    python benchmarks/run.py [--quick] [--suites layer routing products model generation prediction memory lora]
        [--json PATH] [--threads N]

Times are ratios to a baseline measured in the same process, in alternation (see `timing.compare`). Memory cases run
one per fresh process.
"""

import argparse
import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import device  # noqa: E402
from benchmarks.layer import LayerCase  # noqa: E402
from benchmarks.layer import measure as measure_layer  # noqa: E402
from benchmarks.lora import VARIANTS as LORA_VARIANTS  # noqa: E402
from benchmarks.lora import lora_cases, memory_spec  # noqa: E402
from benchmarks.lora import measure as measure_lora  # noqa: E402
from benchmarks.model import ModelCase, measure_generation, measure_training  # noqa: E402
from benchmarks.prediction import measure as measure_prediction  # noqa: E402
from benchmarks.products import ProductCase  # noqa: E402
from benchmarks.products import measure as measure_products  # noqa: E402
from benchmarks.routing import kept_fractions  # noqa: E402
from benchmarks.routing import measure as measure_routing  # noqa: E402

MODEL_KINDS = ["hf_switch", "transformers", "t5"]


def layer_cases(quick: bool) -> list[LayerCase]:
    d_model, d_ff, batch, length = (128, 512, 2, 256) if quick else (512, 2048, 4, 512)
    return [
        LayerCase(d_model, d_ff, batch, length, num_experts, capacity_factor)
        for num_experts in ((8, 32) if quick else (8, 32, 128))
        for capacity_factor in (1.25, None)
    ]


def model_cases(quick: bool) -> tuple[ModelCase, ModelCase]:
    """A model with every other layer sparse (E=8) and one with every layer sparse (E=128, E=32 when quick)."""
    if quick:
        return (
            ModelCase(128, 512, 2, 4, 8, False, 1024, 2, 64, 32),
            ModelCase(128, 512, 2, 4, 32, True, 1024, 2, 64, 32),
        )
    return (
        ModelCase(512, 2048, 4, 8, 8, False, 8192, 4, 128, 64),
        ModelCase(256, 1024, 2, 4, 128, True, 8192, 8, 128, 64),
    )


def print_table(title: str, rows: dict[str, dict], columns: list[str]) -> None:
    print(f"\n{title}")
    print("| case | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for case, results in rows.items():
        cells = [
            f"{results[c]['ratio']:.2f} ({results[c]['median_s'] * 1e3:.0f} ms)" if c in results else "-"
            for c in columns
        ]
        print(f"| {case} | " + " | ".join(cells) + " |")


def run_layer(quick: bool, rounds: int) -> dict:
    rows = {}
    for backward in (False, True):
        for case in layer_cases(quick):
            key = f"{case.name} {'fwd+bwd' if backward else 'fwd'}"
            rows[key] = measure_layer(case, backward, rounds)
            print(f"  {key}: " + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in rows[key].items()), flush=True)
    columns = [
        "balanced_experts",
        "hf_switch",
        "hf_switch_grouped",
        "hf_switch_padded",
        "hf_switch_batched_mm",
        "hf_switch_grouped_mm",
        "transformers",
    ]
    print_table("MoE layer, time / dense FFN time", rows, columns)
    return {"cases": {case.name: asdict(case) for case in layer_cases(quick)}, "ratios": rows}


def run_routing(quick: bool, rounds: int) -> dict:
    """Routing groups side by side at E = 8 and 32: time / per-sequence routing's time, for the whole layer and for
    the router alone. At capacity factor 1.25 the groupings keep different numbers of tokens, so the layer's expert
    work differs too; at 2.0 every grouping keeps (nearly) all of them and the ratio is what grouping costs."""
    cases = [
        replace(case, capacity_factor=factor)
        for case in layer_cases(quick)
        if case.capacity_factor is not None and case.num_experts <= 32
        for factor in (1.25, 2.0)
    ]
    rows, kept = {}, {}
    for router_only in (False, True):
        for backward in (False, True):
            for case in cases:
                kept[case.name] = kept_fractions(case)
                key = f"{'router' if router_only else 'layer'} {case.name} {'fwd+bwd' if backward else 'fwd'}"
                rows[key] = measure_routing(case, backward, rounds, router_only)
                print(f"  {key}: " + ", ".join(f"{k} {v['ratio']:.3f}" for k, v in rows[key].items()), flush=True)
    print_table("MoE layer by routing group, time / per-sequence routing", rows, list(next(iter(rows.values()))))
    print("\nkept share of routed tokens: " + "; ".join(f"{case} {shares}" for case, shares in kept.items()))
    return {"ratios": rows, "kept_fraction": kept}


def product_cases(quick: bool) -> list[ProductCase]:
    """The rows per expert of the layer cases at capacity factor 1.25 (E = 8, 32, 128), and of the E=8 model's
    encoder and decoder sparse layers (64 and 32 rows per expert)."""
    d_model, d_ff, tokens = (128, 512, 640) if quick else (512, 2048, 2560)
    return [ProductCase(d_model, d_ff, experts, tokens // experts) for experts in (8, 32, 128)] + [
        ProductCase(d_model, d_ff, 8, rows) for rows in (64, 32)
    ]


def run_products(quick: bool, rounds: int) -> dict:
    rows = {case.name: measure_products(case, rounds) for case in product_cases(quick)}
    print_table(
        "Expert products alone, time / one dense product of the same arithmetic",
        rows,
        ["batched", "one_row_per_expert"],
    )
    return {"cases": {case.name: asdict(case) for case in product_cases(quick)}, "ratios": rows}


def run_model(quick: bool, rounds: int) -> dict:
    half, every = model_cases(quick)
    rows = {
        half.name: measure_training(half, MODEL_KINDS, rounds),
        every.name: measure_training(every, ["hf_switch", "transformers"], rounds),
    }
    print_table("Training step (forward, backward, fused AdamW), time / last column's time", rows, ["hf_switch"])
    print(f"  {half.name}: transformers / T5 {rows[half.name]['transformers']['ratio']:.2f}")
    return {"cases": {half.name: asdict(half), every.name: asdict(every)}, "ratios": rows}


def run_generation(quick: bool, rounds: int) -> dict:
    half, _ = model_cases(quick)
    new_tokens = 8 if quick else 32
    rows = {half.name: measure_generation(half, MODEL_KINDS, rounds, new_tokens)}
    print_table(f"Greedy generation with cache, {new_tokens} tokens, time / T5's time", rows, MODEL_KINDS[:2])
    return {"cases": {half.name: asdict(half)}, "new_tokens": new_tokens, "ratios": rows}


def run_prediction(quick: bool, rounds: int) -> dict:
    """`hf-switch predict` against a plain `generate()` loop: the mini Switch model, batches of 64 sources."""
    count, new_tokens = (128, 8) if quick else (256, 24)
    rows = measure_prediction(rounds, count=count, new_tokens=new_tokens)
    print_table(
        f"Prediction of {count} sources, {new_tokens} new tokens, time / a plain generate() loop's time",
        rows,
        ["plain generate() loop", "hf-switch predict"],
    )
    for name, variants in rows.items():
        speeds = ", ".join(f"{variant} {result['sentences_per_s']:.1f}" for variant, result in variants.items())
        print(f"  {name}: sentences per second: {speeds}")
    return {"sources": count, "new_tokens": new_tokens, "batch_size": 64, "ratios": rows}


def in_fresh_process(module: str, spec: str) -> dict:
    """`python -m MODULE SPEC` in a new process (memory is measured alone); its last output line, as JSON."""
    output = subprocess.run(
        [sys.executable, "-m", module, spec],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def run_lora(quick: bool, rounds: int) -> dict:
    """LoRA steps side by side (time / attention-only LoRA's), then each variant's peak memory in a fresh process."""
    rows, memory = {}, {}
    for case in lora_cases(quick):
        rows[case.name] = measure_lora(case, rounds)
        print(f"  {case.name}: " + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in rows[case.name].items()), flush=True)
        for variant in LORA_VARIANTS:
            memory[f"{case.name} {variant}"] = in_fresh_process("benchmarks.lora", memory_spec(case, variant))
    print_table("LoRA training step, time / attention-only LoRA's time", rows, list(LORA_VARIANTS))
    print("\nPeak memory of two training steps above the built model's, each variant alone in a fresh process")
    print("| case and variant | MiB | trainable parameters |")
    print("|---|---|---|")
    for name, result in memory.items():
        print(f"| {name} | {result['steps_mib']:.0f} | {result['trainable_parameters']:,} |")
    return {"cases": {case.name: asdict(case) for case in lora_cases(quick)}, "ratios": rows, "memory": memory}


def run_memory(quick: bool) -> dict:
    results = {}
    for case in model_cases(quick):
        kinds = MODEL_KINDS if not case.every_layer_sparse else MODEL_KINDS[:2]
        for kind in kinds:
            spec = json.dumps({"kind": kind, "case": asdict(case), "steps": 2, **device.defaults()})
            results[f"{case.name} {kind}"] = in_fresh_process("benchmarks.memory", spec)
    print("\nPeak memory of training steps, each model alone in a fresh process (MiB)")
    print("| case | peak - after imports | peak - after building | minus grads and AdamW states | parameters |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        total, steps = r["peak_mib"] - r["imported_mib"], r["peak_mib"] - r["built_mib"]
        print(
            f"| {name} | {total:.0f} | {steps:.0f} | {steps - 3 * r['parameter_mib']:.0f} | {r['parameter_mib']:.0f} |"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--suites",
        nargs="+",
        default=["layer", "routing", "products", "model", "generation", "prediction", "memory", "lora"],
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison (default 7, quick 3)")
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write the results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 beside other jobs)")
    parser.add_argument("--device", default="cpu", help="where models and tensors live: cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="models' and inputs' dtype")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device.use(args.device, args.dtype)
    rounds = args.rounds or (3 if args.quick else 7)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick, **device.describe()}
    for suite in args.suites:
        if suite == "memory":
            results[suite] = run_memory(args.quick)
        else:
            suites = {
                "layer": run_layer,
                "routing": run_routing,
                "products": run_products,
                "model": run_model,
                "generation": run_generation,
                "prediction": run_prediction,
                "lora": run_lora,
            }
            results[suite] = suites[suite](args.quick, rounds)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
