"""setuptools build hook (the project's metadata is in pyproject.toml).

It puts ``optimum_evo_lm_eval.pth`` at the root of the built distribution, so that it lands in
``site-packages`` and makes ``lm_eval --model evopress`` work with lm-eval versions that do not
read the ``lm_eval.models`` entry points (see ``_optimum_evo_lm_eval.py``).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - setuptools without PEP 660 editable installs
    editable_wheel = None

PTH = "optimum_evo_lm_eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib, PTH)), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]

    def get_output_mapping(self):
        return {**super().get_output_mapping(), str(Path(self.build_lib, PTH)): PTH}


commands = {"build_py": BuildPyWithPth}

if editable_wheel is not None:

    class EditableWheelWithPth(editable_wheel):
        """``pip install -e .``: the editable wheel's root holds the .pth too (files written into the
        unpacked wheel folder land in site-packages)."""

        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            self.copy_file(PTH, str(Path(unpacked_wheel, PTH)), preserve_mode=False)
            return result

    commands["editable_wheel"] = EditableWheelWithPth

setup(cmdclass=commands)
