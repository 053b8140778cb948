"""Where the tests find the repository's files, wherever a test module sits under tests/."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
MODELS = REPO / "models"
FIXTURES = REPO / "tests" / "fixtures"
