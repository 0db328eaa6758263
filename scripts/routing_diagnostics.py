"""How routing behaves in a trained model, teacher-forced and in greedy decoding: which share of tokens the expert
bias sends away from their most probable expert, and how small the gates that then scale the expert's output are.

    python scripts/routing_diagnostics.py DATA RUN [RUN ...] [--count 200]

DATA is a headline task's data folder (scripts/headline.py: test.jsonl); each RUN a saved model folder. The first
COUNT test sources of each language are decoded greedily (48 new tokens, as headline.py scores them) and, with their
references, run teacher-forced. Prints one table row per run, mode and sparse layer: the share of routed tokens whose
chosen expert is not their most probable one (the bias overrode the router), the mean gate (the probability of the
chosen expert, which scales its output), the mean gate of the overridden tokens, and, for greedy decoding, the share
of outputs that run to the length cap.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from hf_switch.prediction import generate_predictions, load_for_prediction
from hf_switch.routing import SwitchRouter


class RoutingRecorder:
    """Forward hooks on every token-choice router of a stack: per router, the chosen expert's probability and whether
    the choice was the most probable expert, for every routed token of every call."""

    def __init__(self, model, stack: str):
        self.records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles = []
        for name, module in getattr(model, stack).named_modules():
            if isinstance(module, SwitchRouter):
                self.records[f"{stack}.{name.split('.')[1]}"] = []
                self.handles.append(module.register_forward_hook(self._hook(f"{stack}.{name.split('.')[1]}")))

    def _hook(self, layer):
        def record(module, inputs, decision):
            routed = decision.token_mask.bool()
            chosen = decision.expert_index[..., 0][routed]
            gate = decision.probs[routed].gather(-1, chosen[:, None]).squeeze(-1)
            self.records[layer].append((gate, chosen != decision.probs[routed].argmax(-1)))

        return record

    def summary(self) -> dict[str, dict[str, float]]:
        rows = {}
        for layer, calls in self.records.items():
            gate = torch.cat([gate for gate, _ in calls]).float()
            overridden = torch.cat([flag for _, flag in calls])
            rows[layer] = {
                "overridden_share": overridden.float().mean().item(),
                "mean_gate": gate.mean().item(),
                "mean_gate_overridden": gate[overridden].mean().item() if overridden.any() else float("nan"),
            }
        for handle in self.handles:
            handle.remove()
        return rows


def diagnose(run: Path, rows: list[dict]) -> dict:
    model, tokenizer = load_for_prediction(str(run), device="cpu")
    sources, targets = [row["source"] for row in rows], [row["target"] for row in rows]
    result = {}
    recorder = RoutingRecorder(model, "decoder")
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            batch = tokenizer(sources[start : start + 64], text_target=targets[start : start + 64], padding=True)
            labels = torch.tensor(batch["labels"])
            labels[labels == tokenizer.pad_token_id] = -100
            model(
                input_ids=torch.tensor(batch["input_ids"]),
                attention_mask=torch.tensor(batch["attention_mask"]),
                labels=labels,
            )
    result["teacher-forced"] = recorder.summary()
    recorder = RoutingRecorder(model, "decoder")
    predictions = generate_predictions(model, tokenizer, sources, batch_size=64, progress=False, max_new_tokens=48)
    result["greedy"] = recorder.summary()
    lengths = [len(tokenizer(text)["input_ids"]) - 1 for text in predictions]
    result["at_cap"] = float(np.mean([length >= 48 for length in lengths]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--count", type=int, default=200, help="test sources per language")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.data / "test.jsonl").read_text().splitlines()]
    chosen = []
    for language in ("de", "fr", "cs"):
        chosen += [row for row in rows if row["language"] == language][: args.count]
    print("| run | mode | layer | overridden by the bias | mean gate | mean gate, overridden | outputs at the cap |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        result = diagnose(run, chosen)
        for mode in ("teacher-forced", "greedy"):
            for layer, stats in result[mode].items():
                cap = f"{100 * result['at_cap']:.1f} %" if mode == "greedy" else "-"
                print(
                    f"| {run.name} | {mode} | {layer} | {100 * stats['overridden_share']:.1f} % | "
                    f"{stats['mean_gate']:.3f} | {stats['mean_gate_overridden']:.3f} | {cap} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
