"""A Hugging Face config.json is a model config as it is: DeepSeek-V3's own (with num_nextn_predict_layers,
architectures, quantization_config, ...) gives 671B total / 37.6B active through `moeflow model info`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek-v3-config.json"
ROOT = Path(__file__).resolve().parent.parent


def test_model_info_accepts_deepseek_v3_config_json():
    out = subprocess.run([sys.executable, "-m", "flows.cli", "model", "info", "--config", str(FIXTURE), "--json"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert round(info["total_params"] / 1e9, 1) == 671.0 and round(info["active_params"] / 1e9, 1) == 37.6
