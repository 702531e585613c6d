"""The model card (``README.md``) written beside a model's weights: Hub YAML metadata, the sensor
table, training summary, metrics, lineage, usage and citation — all read from the config, so the
card cannot disagree with the weights it describes."""

from __future__ import annotations

import json
from typing import Any

from ..config import XStarsConfig

__all__ = ["CITATION", "model_card"]

CITATION = """@article{marsocci2025xstars,
  title   = {Cross-sensor self-supervised training and alignment for remote sensing},
  author  = {Marsocci, Valerio and Audebert, Nicolas},
  journal = {IEEE Journal of Selected Topics in Applied Earth Observations and Remote Sensing},
  volume  = {18},
  pages   = {12278--12289},
  year    = {2025},
  doi     = {10.1109/JSTARS.2025.3566457}
}

@article{marsocci2024xstars,
  title   = {Cross-sensor self-supervised training and alignment for remote sensing},
  author  = {Marsocci, Valerio and Audebert, Nicolas},
  journal = {arXiv preprint arXiv:2405.09922},
  year    = {2024}
}"""


def _yaml_value(value: Any) -> str:
    # JSON strings are valid YAML scalars and quote anything that needs it.
    return json.dumps(value)


def model_card(
    config: XStarsConfig, repo_id: str, license: str = "mit", description: str = "", notes: str = ""
) -> str:
    """Markdown model card with YAML front matter for ``repo_id``; ``notes`` (markdown: data
    credits, limitations) goes before the citation."""
    base_model = config.lineage.get("base_model")
    tags = ["remote-sensing", "earth-observation", "x-stars", "self-supervised", "timm", *config.sensors]
    front = [
        "---",
        "library_name: xstars-models",
        "pipeline_tag: image-feature-extraction",
        f"license: {_yaml_value(license)}",
        "tags:",
        *[f"- {_yaml_value(t)}" for t in tags],
    ]
    if base_model and "/" in str(base_model) and not str(base_model).startswith(("/", ".")):
        front.append(f"base_model: {_yaml_value(base_model)}")
    front.append("---")

    rows = [
        "| sensor | bands (centre wavelength, um) | GSD | patch | input | mean / std (after scaling) | statistics from |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, stem in config.sensors.items():
        spec = stem.spec
        bands = ", ".join(f"{b.name} ({b.center_um:.3f})" for b in spec.bands)
        stats = "; ".join(f"{b.mean:.4f} / {b.std:.4f}" for b in spec.bands)
        scaling = f"{spec.dtype} x {spec.scale:.6g}" + (f" {spec.offset:+g}" if spec.offset else "")
        rows.append(
            f"| `{name}` | {bands} | {spec.gsd_m:g} m | {stem.patch_size} px = {stem.token_ground_m:g} m | "
            f"{scaling} | {stats} | {spec.normalisation_source or 'n/a'} |"
        )

    primary = config.primary_sensor
    sections = [
        "\n".join(front),
        f"# {repo_id}",
        description
        or "An X-STARS cross-sensor encoder: one ViT trunk shared by every sensor, one input stem per sensor.",
        "## Sensors\n\n" + "\n".join(rows),
        "## Architecture\n\n"
        f"timm `{config.arch}` with overrides `{json.dumps(config.arch_kwargs)}`. `model.safetensors` holds the "
        f"trunk with timm's own keys (its patch embedding is the `{primary}` stem); each other sensor's patch "
        "embedding is in `stem-<sensor>.safetensors`." + _whitening_note(config.whitening),
        "## Lineage\n\n" + (_json_block(config.lineage) if config.lineage else "Trained from scratch."),
        "## Training\n\n"
        + _monitors_table(config.training)
        + (_json_block(config.training) if config.training else "Not recorded."),
        "## Metrics\n\n" + (_json_block(config.metrics) if config.metrics else "Not evaluated."),
        "## Usage\n\n```python\n"
        "from xstars_models import XStars\n"
        f'model = XStars.from_pretrained("{repo_id}")\n'
        f'features = model.embed(images, sensor="{primary}", output="map")  # B x D x h x w\n'
        + (f'vectors = model.embed(images, sensor="{primary}", whiten=True)  # B x D, to compare across sensors\n'
           if config.whitening else "")
        + "```\n\n" + _timm_usage(config, repo_id),
        *([notes] if notes else []),
        "## Citation\n\n```bibtex\n" + CITATION + "\n```",
    ]
    return "\n\n".join(sections) + "\n"


def _whitening_note(whitening: dict[str, Any]) -> str:
    if not whitening:
        return ""
    return (
        f" `whitening.safetensors` whitens the global embeddings ({', '.join(map(str, whitening.get('pools', [])))}) "
        f"of sensors {', '.join(map(str, whitening.get('sensors', [])))} for `embed(..., whiten=True)`: each sensor's "
        f"mean removed, one shared PCA whitening (shrinkage {whitening.get('shrinkage')}), fit on "
        f"{whitening.get('fit_on') or 'unrecorded data'}."
    )


def _timm_usage(config: XStarsConfig, repo_id: str) -> str:
    """The plain-timm snippet: ``config.json`` carries timm's keys, so ``hf-hub:`` needs no
    arguments; what timm cannot know is how the sensor's digital numbers become its inputs."""
    primary = config.primary_sensor
    spec = config.sensors[primary].spec
    c = spec.num_bands
    return (
        f"Plain timm (the trunk with the `{primary}` stem, {c} input bands, no classifier):\n\n```python\n"
        "import timm, torch\n"
        f'trunk = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
        f"# dn: {c} x H x W digital numbers of `{primary}` ({spec.dtype}); inputs are\n"
        "# (dn * scale + offset - mean) / std with mean/std from the trunk's pretrained_cfg\n"
        f"scale, offset = {spec.scale!r}, {spec.offset!r}\n"
        "mean = torch.tensor(trunk.pretrained_cfg[\"mean\"]).view(-1, 1, 1)\n"
        "std = torch.tensor(trunk.pretrained_cfg[\"std\"]).view(-1, 1, 1)\n"
        "x = (torch.as_tensor(dn, dtype=torch.float32) * scale + offset - mean) / std\n"
        "tokens = trunk.forward_features(x[None])  # 1 x (1 + h*w) x D, CLS first\n"
        "```\n\n"
        "A downloaded folder loads the same way with `timm.create_model(\"local-dir:<folder>\", pretrained=True)`."
    )


def _monitors_table(training: dict[str, Any]) -> str:
    """The collapse monitors of each recorded stage at its last step, as a table ("" when the
    record has none): a collapsed stage must be visible on the card, not only in the JSON."""
    stages = {name: part for name, part in training.items() if isinstance(part, dict) and "monitors" in part}
    if "monitors" in training:
        stages = {"training": training}
    if not stages:
        return ""
    rows = [
        "Collapse monitors at the last step (teacher entropy against its ceiling ln K; CLS spread: 0 = one "
        "embedding for every image, ~1 = spread over the sphere; effective rank of a fixed batch):\n",
        "| stage | teacher entropy / ln K | CLS spread | effective rank | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, part in stages.items():
        m = part["monitors"]
        entropy = f"{m['teacher_entropy']:.3f} / {m['ln_k']:.3f}" if "teacher_entropy" in m and m.get("ln_k") else "n/a"
        spread = f"{m['cls_spread']:.3f}" if "cls_spread" in m else "n/a"
        rank = f"{m['rank']:.1f}" if "rank" in m else "n/a"
        verdict = "COLLAPSED: " + "; ".join(m["reasons"]) if m.get("collapsed") else "no collapse"
        rows.append(f"| {name} | {entropy} | {spread} | {rank} | {verdict} |")
    return "\n".join(rows) + "\n\n"


def _json_block(data: dict[str, Any]) -> str:
    return "```json\n" + json.dumps(data, indent=2, default=str) + "\n```"
