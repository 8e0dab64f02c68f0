"""The bundled deployment configs: the presets templates are compiled from, and the local demos.

They ship inside the package (the repository's configs/ links here), so `vlp render configs/NAME.yaml` and
`vlp compile` work from any directory once the package is installed.
"""

from __future__ import annotations

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent


def preset_paths() -> list[Path]:
    """The presets that become console templates: every bundled config except the local-stack ones."""
    return sorted(p for p in PRESETS_DIR.glob("*.yaml") if not p.name.startswith("local-"))


def config_path(name: str | Path) -> Path:
    """A config file, or else a bundled preset by file name (configs/NAME.yaml, NAME.yaml or NAME)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = PRESETS_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    return bundled if bundled.is_file() else path
