"""Registers ``optimum-cli evopress`` (optimum-evo's EvoPress search) with optimum-cli.

This folder is a PEP 420 namespace shared with optimum and its other subpackages: it must never
contain an ``__init__.py``. optimum-cli imports every module here and registers ``REGISTER_COMMANDS``.
"""

from optimum_evo.integrations.optimum import EvoPressCommand

REGISTER_COMMANDS = [EvoPressCommand]
