"""Model presets (`<name>.json`, Hugging Face config fields) and latency profiles (`profiles/`), installed as
package data so that a non-editable install finds them too."""

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent
PROFILES_DIR = CONFIGS_DIR / "profiles"
