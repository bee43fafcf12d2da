"""The MoE++ model definitions. These files (all but this one) are copied into every output as remote code."""

from pathlib import Path

REMOTE_CODE_FILES = ("configuration_upcycle_moepp.py", "modeling_upcycle_moepp.py", "moepp_layer.py")
MODELING_DIR = Path(__file__).parent
