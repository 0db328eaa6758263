"""Publish a model folder to the Hugging Face Hub in one commit, with a model card.

Three kinds of folders, told apart by their files:

- `"switch"`: `config.json` of model type "hf_switch" (or transformers' "switch_transformers", converted on the way).
  Written as safetensors in hf_switch's layout, with the modeling code and `auto_map`, so that people without
  hf_switch load it with `trust_remote_code=True`.
- `"adapter"`: a peft adapter (`adapter_config.json`). Its files are copied; the card names the base model.
- `"student"`: `config.json` of any other model type, such as a dense T5 distilled from a Switch teacher. Written as
  safetensors; the card names the teacher and what was kept when the folder has a `distillation.json`.

The card reads these files when the folder has them, and they are uploaded along (schemas in the repository's
`model_cards/README.md`): `routing_stats.json` (routing measured in training), `eval_results.json` (becomes the
card's `model-index`), `distillation.json` and `*.png` plots. Tokenizer files are uploaded as they are.

The card metadata is validated here, before anything is sent: `ModelCard.validate()` would ask the Hub.
"""

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open
from transformers import AutoModelForSeq2SeqLM

from .configuration_switch import SwitchConfig
from .experts import SwitchExperts
from .modeling_switch import SwitchForConditionalGeneration

SWITCH_MODEL_TYPES = (SwitchConfig.model_type, "switch_transformers")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
CARD_INPUT_FILES = ("routing_stats.json", "eval_results.json", "distillation.json")
# Keys of transformers' `Trainer.save_metrics("eval")` file that measure speed, not quality.
TRAINER_SPEED_KEYS = ("epoch", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
# The license identifiers the Hub accepts in card metadata (its validation error lists them).
HUB_LICENSES = frozenset(
    "apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m "
    "afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 "
    "cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 "
    "cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 "
    "cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl "
    "gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr "
    "mpl-2.0 odc-by odbl openmdw-1.0 openmdw-1.1 openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl "
    "lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 "
    "grok2-community gemma unknown other".split()
)
# ISO 639-1/2/3 codes, optionally with a region or script ("en", "pt-BR", "zh-Hans"), or "multilingual".
LANGUAGE_PATTERN = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*|multilingual")


class PublishError(Exception):
    """Publishing stopped; the message says what is wrong and how to fix it."""


@dataclass
class PublishResult:
    """What `publish` built and, unless it was a dry run, where it went.

    Attributes:
        kind: "switch", "adapter" or "student".
        files: Paths of the Hub-ready folder's files, relative to it, sorted.
        folder: Where that folder was written (`local_dir`); `None` when it lived in a temporary folder.
        commit_url: The commit on the Hub; `None` for a dry run.
        pull_request_url: The pull request, with `create_pr=True`.
    """

    kind: str
    files: list[str]
    folder: Path | None
    commit_url: str | None = None
    pull_request_url: str | None = None


@dataclass
class ParameterCount:
    """Parameters of a model: all of them, and those one token is multiplied with (top-k experts per sparse layer)."""

    total: int
    active: int


@dataclass
class CardContent:
    """What one kind of folder contributes to its card: template variables and metadata defaults."""

    variables: dict
    tags: list[str]
    library_name: str
    base_model: str | None = None


def publish(
    folder,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    exist_ok: bool = False,
    dry_run: bool = False,
    local_dir=None,
    token: str | None = None,
    *,
    license: str | None = None,
    language: str | list[str] | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    base_model: str | None = None,
    max_shard_size: int | str = "5GB",
) -> PublishResult:
    """Build a Hub-ready folder from a Switch model, a peft adapter or a dense student folder, and upload it.

    Everything that can be checked locally is checked before the first request: the token is present, the folder is
    of a known kind, the card metadata is valid. The upload is one commit, so a failure leaves the repository as it
    was.

    Args:
        folder: The folder to publish (see the module docstring for the kinds).
        repo_id: "ORG/NAME" on the Hub.
        private: Create the repository as private (ignored when it exists).
        revision: The branch to commit to; created from main when missing. Defaults to main.
        commit_message: Defaults to "Upload <kind> with hf_switch".
        create_pr: Open a pull request instead of committing to the branch.
        exist_ok: Commit to a repository that already exists instead of refusing.
        dry_run: Build the folder in `local_dir` and stop: no token needed, nothing sent.
        local_dir: Where to build the folder (must be empty or new); a temporary folder by default.
        token: A Hub token; defaults to `HF_TOKEN` or the login cache (`hf auth login`).
        license: A Hub license identifier, e.g. "apache-2.0".
        language: Language code(s) of the data, e.g. "en" or ["en", "de"].
        datasets: Hub ids of the training datasets.
        tags: Tags added to the kind's own (e.g. "mixture-of-experts", "switch-transformers").
        base_model: Hub id of the model this one derives from; for an adapter it overrides `adapter_config.json`.
        max_shard_size: Largest safetensors file; bigger models are sharded (as in `save_pretrained`).
    """
    if not _is_repo_id(repo_id):
        raise PublishError(
            f"repo_id {repo_id!r} is not a Hub repo id: use 'ORG/NAME' (letters, digits, '-', '_', '.')."
        )
    if dry_run and local_dir is None:
        raise PublishError("A dry run writes the folder it would upload to local_dir: pass local_dir (--local-dir).")
    if not dry_run:
        token = _require_token(token)
    with _output_folder(local_dir) as output_dir:
        kind = build_hub_folder(
            folder,
            output_dir,
            repo_id,
            license=license,
            language=language,
            datasets=datasets,
            tags=tags,
            base_model=base_model,
            max_shard_size=max_shard_size,
        )
        result = PublishResult(
            kind=kind,
            files=sorted(str(path.relative_to(output_dir)) for path in output_dir.rglob("*") if path.is_file()),
            folder=None if local_dir is None else output_dir,
        )
        if dry_run:
            return result
        commit = _upload(
            output_dir,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message or f"Upload {kind} with hf_switch",
            create_pr=create_pr,
            exist_ok=exist_ok,
        )
    result.commit_url, result.pull_request_url = commit.commit_url, commit.pr_url
    return result


def build_hub_folder(
    folder,
    output_dir,
    repo_id: str,
    *,
    license: str | None = None,
    language: str | list[str] | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    base_model: str | None = None,
    max_shard_size: int | str = "5GB",
) -> str:
    """Write the Hub-ready folder of `folder` into `output_dir`, card included; returns the folder's kind.

    The arguments are those of [`publish`]. Raises `PublishError` when the card's metadata is invalid.
    """
    folder, output_dir = Path(folder), Path(output_dir)
    kind = detect_kind(folder)
    routing, evaluation = read_routing_stats(folder), read_eval_results(folder, datasets)
    content = FOLDER_BUILDERS[kind](folder, output_dir, max_shard_size)
    if base_model is None and _is_repo_id(content.base_model):
        base_model = content.base_model
    if kind == "adapter" and base_model is None:
        raise PublishError(
            f"The adapter's base model {content.base_model!r} (base_model_name_or_path in "
            f"{folder / 'adapter_config.json'}) is not a Hub repo id, so the card could not say what to load it onto. "
            "Pass base_model='ORG/NAME' (--base-model) naming the base model on the Hub."
        )
    copied = _copy_present(folder, output_dir, TOKENIZER_FILES + CARD_INPUT_FILES)
    plots = sorted(path.name for path in folder.glob("*.png"))
    _copy_present(folder, output_dir, plots)
    card_data = ModelCardData(
        license=license,
        language=language,
        datasets=datasets,
        base_model=base_model,
        tags=list(dict.fromkeys([*content.tags, *(tags or [])])),
        pipeline_tag="text2text-generation",
        library_name=content.library_name,
        model_name=repo_id if evaluation else None,
        eval_results=evaluation.to_eval_results() if evaluation else None,
    )
    card = render_card(
        kind,
        card_data,
        repo_id=repo_id,
        base_model=base_model,
        has_tokenizer=any(name in copied for name in TOKENIZER_FILES),
        prefix=_saved_prefix(folder),
        routing=routing,
        plots=plots,
        evaluation=evaluation,
        **content.variables,
    )
    validate_card_data(card.data)
    card.save(output_dir / "README.md")
    return kind


def _saved_prefix(folder: Path) -> str:
    """The source prefix a run trained with (`config.prefix`, written by `hf-switch train --source_prefix`)."""
    config_file = folder / "config.json"
    return json.loads(config_file.read_text()).get("prefix") or "" if config_file.is_file() else ""


def detect_kind(folder: Path) -> str:
    """ "switch", "adapter" or "student" (any other model type), from the folder's files."""
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise PublishError(
            f"{folder} is not a model folder: it has neither config.json (a model saved with save_pretrained) nor "
            "adapter_config.json (a peft adapter)."
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    return "switch" if model_type in SWITCH_MODEL_TYPES else "student"


def _build_switch(folder: Path, output_dir: Path, max_shard_size) -> CardContent:
    model = SwitchForConditionalGeneration.from_pretrained(folder)
    save_with_remote_code(model, output_dir, max_shard_size=max_shard_size)
    variables = {
        "config": model.config,
        "parameters": count_parameters(model),
        "capacity": describe_capacity(model.config),
        "balancing": describe_balancing(model.config),
    }
    return CardContent(
        variables, tags=["mixture-of-experts", "switch-transformers", "hf_switch"], library_name="transformers"
    )


def _build_adapter(folder: Path, output_dir: Path, max_shard_size) -> CardContent:
    del max_shard_size  # an adapter is saved as it is
    _copy_present(folder, output_dir, ADAPTER_FILES)
    adapter = json.loads((folder / "adapter_config.json").read_text())
    variables = {"adapter": adapter, "adapter_parameters": count_adapter_parameters(output_dir)}
    tags = ["peft", str(adapter.get("peft_type", "adapter")).lower(), "mixture-of-experts", "hf_switch"]
    return CardContent(variables, tags=tags, library_name="peft", base_model=adapter.get("base_model_name_or_path"))


def _build_student(folder: Path, output_dir: Path, max_shard_size) -> CardContent:
    distillation = read_distillation(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    variables = {
        "model_type": model.config.model_type,
        "parameters": count_parameters(model),
        "distillation": distillation,
    }
    teacher = distillation["teacher"] if distillation else None
    return CardContent(variables, tags=["distillation", "hf_switch"], library_name="transformers", base_model=teacher)


FOLDER_BUILDERS = {"switch": _build_switch, "adapter": _build_adapter, "student": _build_student}


def save_with_remote_code(model: SwitchForConditionalGeneration, save_directory, **kwargs) -> None:
    """`save_pretrained`, plus the code files and `auto_map` with which `trust_remote_code=True` loads the folder."""
    config_class, model_class = type(model.config), type(model)
    previous = config_class._auto_class, model_class._auto_class
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForSeq2SeqLM")
    try:
        model.save_pretrained(save_directory, **kwargs)
    finally:
        # `register_for_auto_class` marks the classes; unmark them so that later saves in this process write no code.
        config_class._auto_class, model_class._auto_class = previous


def count_parameters(model) -> ParameterCount:
    """All parameters (tied ones once), and those active per token: every sparse layer counts `router_top_k` experts."""
    total = sum(parameter.numel() for parameter in model.parameters())
    idle = 0
    for module in model.modules():
        if isinstance(module, SwitchExperts):
            per_expert = sum(parameter.numel() for parameter in module.parameters()) // module.num_local_experts
            idle += (module.num_experts - model.config.router_top_k) * per_expert
    return ParameterCount(total=total, active=total - idle)


def count_adapter_parameters(folder: Path) -> int | None:
    """Parameters in `adapter_model.safetensors`, read from its header; `None` without one."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(weights, "pt") as checkpoint:
        return sum(math.prod(checkpoint.get_slice(name).get_shape()) for name in checkpoint.keys())


def describe_capacity(config: SwitchConfig) -> str:
    """How many tokens each expert takes, and counted over which tokens, in words."""
    group = {"sequence": "each sequence", "batch": "all tokens of a forward"}.get(
        config.routing_group, f"groups of {config.routing_group} tokens"
    )
    if config.expert_capacity is not None:
        return f"{config.expert_capacity} tokens per expert and routing group ({group}), in training and evaluation"

    def factor(value) -> str:
        return "no limit (dropless)" if value is None else f"factor {value}"

    return (
        f"{factor(config.capacity_factor)} in training, {factor(config.eval_capacity_factor)} in evaluation, per "
        f"routing group ({group}; factor f: f x top-k x group tokens / experts slots, at least "
        f"{config.min_expert_capacity})"
    )


def describe_balancing(config: SwitchConfig) -> str:
    """Which load-balancing methods train the routers, in words."""
    scope = "the global batch" if config.load_balancing_scope == "global_batch" else "each routing group"
    methods = []
    if config.router_aux_loss_coef > 0:
        methods.append(f"auxiliary loss over {scope}")
    if config.router_expert_bias:
        methods.append(
            f"per-expert selection bias (auxiliary-loss-free, step {config.router_bias_update_rate} per optimizer step)"
        )
    token_choice = " + ".join(methods) or "none"
    if config.encoder_router_type == "experts_choose":
        return (
            f"encoder: expert choice, balanced by construction (each expert takes "
            f"{config.expert_choice_capacity_factor} x its share of a routing group's tokens); decoder: {token_choice}"
        )
    return token_choice


@dataclass
class LayerRouting:
    """Routing of one sparse layer, summarised for the card."""

    name: str
    max_over_mean: float
    coefficient_of_variation: float
    dropped_fraction: float | None
    aux_loss: float | None
    z_loss: float | None


@dataclass
class RoutingStats:
    """The contents of `routing_stats.json`."""

    step: int | None
    layers: list[LayerRouting]


def read_routing_stats(folder: Path) -> RoutingStats | None:
    """The last logged step of `routing_stats.json` if the folder has one with a logged step.

    The file is what `hf_switch.training.RoutingDashboardCallback` writes (schema in model_cards/README.md); a run
    shorter than its logging interval writes an empty history, and its card has no routing section.
    """
    path = folder / "routing_stats.json"
    if not path.is_file():
        return None
    stats = json.loads(path.read_text())
    history = stats.get("history") if isinstance(stats, dict) else None
    _require_in_file(isinstance(history, list), path, "history", "a list of logged steps")
    if not history:
        return None
    last = history[-1]
    layers = last.get("layers") if isinstance(last, dict) else None
    _require_in_file(
        isinstance(layers, dict) and layers,
        path,
        "history[-1].layers",
        "a non-empty mapping of layer name to statistics",
    )
    return RoutingStats(
        step=last.get("step"), layers=[_layer_routing(name, layer, path) for name, layer in layers.items()]
    )


def _layer_routing(name: str, layer: dict, path: Path) -> LayerRouting:
    counts = layer.get("expert_counts") if isinstance(layer, dict) else None
    _require_in_file(
        isinstance(counts, list) and counts and all(_is_number(c) and c >= 0 for c in counts) and sum(counts) > 0,
        path,
        "history[].layers[].expert_counts",
        "a list of token counts (numbers >= 0, not all 0), one per expert",
    )
    optional = {key: layer.get(key) for key in ("dropped_fraction", "aux_loss", "z_loss")}
    for key, value in optional.items():
        _require_in_file(value is None or _is_number(value), path, f"history[].layers[].{key}", "a number")
    mean = sum(counts) / len(counts)
    variance = sum((count - mean) ** 2 for count in counts) / len(counts)
    return LayerRouting(
        name=name,
        max_over_mean=max(counts) / mean,
        coefficient_of_variation=math.sqrt(variance) / mean,
        **optional,
    )


@dataclass
class Evaluation:
    """Evaluation results on one dataset: the card's table and, where the dataset is known, its `model-index`."""

    task_type: str
    dataset_name: str | None
    dataset_type: str | None
    dataset_config: str | None
    dataset_split: str | None
    metrics: dict[str, float]

    def to_eval_results(self) -> list[EvalResult] | None:
        if self.dataset_type is None:  # a model-index entry must name its dataset
            return None
        return [
            EvalResult(
                task_type=self.task_type,
                dataset_type=self.dataset_type,
                dataset_name=self.dataset_name,
                dataset_config=self.dataset_config,
                dataset_split=self.dataset_split,
                metric_type=metric,
                metric_value=value,
            )
            for metric, value in self.metrics.items()
        ]


def read_eval_results(folder: Path, datasets: list[str] | None) -> Evaluation | None:
    """Read `eval_results.json` if the folder has one: hf_switch's schema, or transformers' `Trainer.save_metrics`.

    A Trainer file names no dataset; the first of `datasets` is used, and without one the card shows the metrics
    without a `model-index`.
    """
    path = folder / "eval_results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    _require_in_file(isinstance(results, dict), path, "the top level", "a JSON object")
    if "metrics" in results:
        metrics, dataset = results["metrics"], results.get("dataset")
    else:  # Trainer.save_metrics("eval"): {"eval_loss": 1.2, "eval_bleu": 30.1, "eval_runtime": 3.4, ...}
        metrics = {k.removeprefix("eval_"): v for k, v in results.items() if k not in TRAINER_SPEED_KEYS}
        dataset = {"name": datasets[0], "type": datasets[0]} if datasets else None
    _require_in_file(
        isinstance(metrics, dict) and metrics and all(_is_number(v) for v in metrics.values()),
        path,
        "metrics",
        "a non-empty object of metric name to number",
    )
    if dataset is None and "metrics" not in results:
        dataset = {}
    else:
        _require_in_file(
            isinstance(dataset, dict) and isinstance(dataset.get("name"), str) and isinstance(dataset.get("type"), str),
            path,
            "dataset",
            'an object with "name" and "type"',
        )
    return Evaluation(
        task_type=results.get("task_type", "text2text-generation"),
        dataset_name=dataset.get("name"),
        dataset_type=dataset.get("type"),
        dataset_config=dataset.get("config"),
        dataset_split=dataset.get("split"),
        metrics=metrics,
    )


def read_distillation(folder: Path) -> dict | None:
    """Read `distillation.json` if the folder has one: "teacher" and any settings worth showing on the card."""
    path = folder / "distillation.json"
    if not path.is_file():
        return None
    distillation = json.loads(path.read_text())
    _require_in_file(
        isinstance(distillation, dict) and isinstance(distillation.get("teacher"), str),
        path,
        "teacher",
        "the teacher's Hub id or path, as a string",
    )
    return distillation


def render_card(kind: str, card_data: ModelCardData, **variables) -> ModelCard:
    """Render `model_cards/<kind>.md` with the card's metadata as YAML front matter, as `ModelCard.from_template` does.

    `from_template` renders without a template loader, so the shared sections (`_routing.md`, `_evaluation.md`)
    could not be included; this renders from the package's templates and parses the result as a `ModelCard`.
    """
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("hf_switch", "model_cards"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(count=_format_count, optional=_format_optional, listing=_format_listing)
    template = environment.get_template(f"{kind}.md")
    return ModelCard(template.render(card_data=card_data.to_yaml(), **variables))


def validate_card_data(card_data: ModelCardData) -> None:
    """Check the metadata the Hub would check, and raise one `PublishError` that lists every problem."""
    problems = []
    if card_data.license is not None and card_data.license not in HUB_LICENSES:
        problems.append(f"license {card_data.license!r} is not a Hub license identifier (e.g. 'apache-2.0', 'mit')")
    for language in _as_list(card_data.language):
        if not (isinstance(language, str) and LANGUAGE_PATTERN.fullmatch(language)):
            problems.append(f"language {language!r} is not a language code (e.g. 'en', 'de', 'pt-BR')")
    for tag in _as_list(card_data.tags):
        if not (isinstance(tag, str) and tag.strip() == tag and tag and "\n" not in tag):
            problems.append(f"tag {tag!r} must be a non-empty string without surrounding whitespace")
    for field in ("datasets", "base_model"):
        for repo_id in _as_list(getattr(card_data, field)):
            if not _is_repo_id(repo_id):
                problems.append(f"{field} entry {repo_id!r} is not a Hub repo id ('ORG/NAME')")
    for result in card_data.eval_results or []:
        if not (_is_number(result.metric_value) and math.isfinite(result.metric_value)):
            problems.append(f"eval result {result.metric_type!r} has value {result.metric_value!r}, not a number")
    if problems:
        raise PublishError("Invalid model card metadata, nothing was uploaded:\n- " + "\n- ".join(problems))


def _upload(output_dir: Path, repo_id: str, *, token: str, private, revision, commit_message, create_pr, exist_ok):
    """Create the repository (and branch), then upload `output_dir` in one commit."""
    api = HfApi(token=token)
    with _reaching_hub(api):
        try:
            api.whoami()
        except HfHubHTTPError as error:
            raise PublishError(
                f"The Hub at {api.endpoint} rejected the token ({_first_line(error)}). Log in with `hf auth login` or "
                "set HF_TOKEN to a token with write access."
            ) from error
        try:
            api.create_repo(repo_id, private=private, exist_ok=exist_ok)
        except HfHubHTTPError as error:
            if error.response.status_code != 409:
                raise PublishError(f"Creating {repo_id} on the Hub failed: {_first_line(error)}") from error
            raise PublishError(
                f"The Hub repository {repo_id} already exists. Pass exist_ok=True (--exist-ok) to add a commit to it "
                "(with create_pr=True / --create-pr to propose it as a pull request), or choose another repo_id."
            ) from error
        if revision not in (None, "main") and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    try:
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
    # HTTP and connection errors, and huggingface_hub's RuntimeError around a failed LFS file upload.
    except (HTTPError, RuntimeError) as error:
        raise PublishError(
            f"Uploading to {repo_id} failed: {_first_line(error)}. Nothing was half-published: the files go to the "
            f"Hub in one commit, applied whole or not at all, so {repo_id}@{revision or 'main'} is unchanged unless "
            "the commit landed just before the connection broke. The repository exists now: run again with "
            "exist_ok=True (--exist-ok) once the connection works."
        ) from error


@contextmanager
def _reaching_hub(api: HfApi) -> Iterator[None]:
    """Turn a failure to reach the Hub (no HTTP answer at all) into a `PublishError`."""
    try:
        yield
    except HfHubHTTPError:
        raise
    except HTTPError as error:
        raise PublishError(
            f"Could not reach the Hub at {api.endpoint} ({error}); nothing was published. Check the network, or "
            "HF_ENDPOINT if you use a mirror."
        ) from error


def _require_token(token: str | None) -> str:
    token = token or get_token()
    if token is None:
        raise PublishError(
            "No Hugging Face token found, and publishing needs one with write access. Log in with `hf auth login`, "
            "set HF_TOKEN, or pass token=... (or use dry_run=True to build the folder without uploading)."
        )
    return token


@contextmanager
def _output_folder(local_dir) -> Iterator[Path]:
    """`local_dir`, which must be empty or new so that only this model's files are uploaded; else a temporary one."""
    if local_dir is None:
        with tempfile.TemporaryDirectory(prefix="hf_switch_publish_") as temporary:
            yield Path(temporary)
        return
    local_dir = Path(local_dir)
    existed = local_dir.exists()
    if existed and any(local_dir.iterdir()):
        raise PublishError(f"local_dir {local_dir} is not empty: choose a new or empty folder to build the upload in.")
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield local_dir
    except BaseException:
        # Leave local_dir as it was (new or empty) instead of half-built, so that a rerun can use it.
        shutil.rmtree(local_dir)
        if existed:
            local_dir.mkdir()
        raise


def _copy_present(source: Path, destination: Path, names) -> list[str]:
    """Copy those of `names` that exist in `source`; returns their names."""
    present = [name for name in names if (source / name).is_file()]
    for name in present:
        shutil.copy2(source / name, destination / name)
    return present


def _require_in_file(condition: bool, path: Path, field: str, allowed: str) -> None:
    if not condition:
        raise PublishError(f"{path}: {field} must be {allowed} (see model_cards/README.md for the schema).")


def _is_repo_id(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _first_line(error: Exception) -> str:
    """The gist of an error, for a message that goes on after it."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def _format_count(count: int | None) -> str:
    """14784 -> "14,784 (14.8K)"."""
    if count is None:
        return "not counted"
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count:,} ({count / size:.1f}{unit})"
    return f"{count:,}"


def _format_optional(value, spec: str) -> str:
    return "-" if value is None else spec % value


def _format_listing(value) -> str:
    if value is None:
        return "-"
    return ", ".join(f"`{item}`" for item in value) if isinstance(value, list) else f"`{value}`"


__all__ = ["PublishError", "PublishResult", "build_hub_folder", "count_parameters", "publish"]
