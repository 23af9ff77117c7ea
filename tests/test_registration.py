"""The seam where peft-ladder extends PEFT's closed `PeftType` set (`peft_ladder/_registration.py`)."""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
from peft import mapping
from peft.utils import PeftType

import peft_ladder
from peft_ladder import LadderConfig, LadderModel, LadderPeftType
from peft_ladder._registration import LADDER_PREFIX, register

TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def test_importing_the_package_fills_peft_lookup_tables():
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["LADDER"] is LadderConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["LADDER"] is LadderModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["LADDER"] == LADDER_PREFIX


def test_register_is_idempotent():
    before = {name: dict(getattr(mapping, name)) for name in TABLES}
    register(LadderConfig, LadderModel)
    register(LadderConfig, LadderModel)
    assert {name: dict(getattr(mapping, name)) for name in TABLES} == before


def test_peft_type_behaves_like_peft_own_enum_values():
    config = LadderConfig(task_type="CAUSAL_LM")
    assert config.peft_type == "LADDER" and config.peft_type.value == "LADDER" and str(config.peft_type) == "LADDER"
    assert isinstance(config.peft_type, str) and isinstance(PeftType.LORA, str)
    assert json.loads(json.dumps(config.to_dict()))["peft_type"] == "LADDER"
    assert LadderPeftType("LADDER") is LadderPeftType.LADDER


def test_another_owner_of_the_name_is_refused(monkeypatch):
    class OtherConfig:
        pass

    monkeypatch.setitem(mapping.PEFT_TYPE_TO_CONFIG_MAPPING, LadderPeftType.LADDER, OtherConfig)
    with pytest.raises(RuntimeError, match=r"PEFT_TYPE_TO_CONFIG_MAPPING\['LADDER'\] is already taken .*uninstall"):
        register(LadderConfig, LadderModel)
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["LADDER"] is LadderModel  # nothing half-written


def test_another_owner_of_the_prefix_is_refused(monkeypatch):
    monkeypatch.setitem(mapping.PEFT_TYPE_TO_PREFIX_MAPPING, "OTHER", LADDER_PREFIX)
    with pytest.raises(RuntimeError, match=r"prefix 'ladder_' is already used by PEFT type 'OTHER'"):
        register(LadderConfig, LadderModel)


def test_old_peft_is_refused_with_the_upgrade_command(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.20.0")
    with pytest.raises(ImportError, match=r"peft>=0.21.0 \(found peft==0.20.0\).*pip install -U 'peft>=0.21.0'"):
        register(LadderConfig, LadderModel)


def test_public_api():
    assert set(peft_ladder.__all__) >= {"LadderConfig", "LadderModel", "LadderPeftType"}


def run(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_python_start_up_imports_neither_torch_nor_peft():
    # The start-up hook (`peft_ladder_autoload.pth`) only installs a finder; it must cost nothing until `import peft`.
    result = run("import sys; print(sorted(m for m in ('torch', 'peft', 'peft_ladder') if m in sys.modules))")
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_import_peft_alone_registers_ladder():
    result = run(
        "import peft, sys; from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as m; "
        "print('LADDER' in m, 'peft_ladder' in sys.modules)"
    )
    assert result.stdout.split() == ["True", "True"], result.stderr


def test_autoload_can_be_turned_off():
    result = run("import peft, sys; print('peft_ladder' in sys.modules)", PEFT_LADDER_NO_AUTOLOAD="1")
    assert result.stdout.strip() == "False", result.stderr


def test_a_broken_plugin_warns_but_never_breaks_import_peft():
    # A failing `import peft_ladder` (simulated by a module that raises) must leave `import peft` working.
    code = (
        "import sys, types, importlib.abc\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'peft_ladder': raise RuntimeError('boom')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import peft\n"
        "print('imported', any('could not register the LADDER tuner' in str(w.message) for w in caught))\n"
    )
    result = run(code)
    assert result.stdout.split() == ["imported", "True"], result.stderr
