"""`edgefleet up`: the whole fleet on one machine (broker, fleet manager, refiner, agents), in one command.

See docs/local-stack.md. The command's module imports only what `--help` needs; the rest loads when it runs.
"""

from fleet_manager.local_stack.cli import up_command

__all__ = ["up_command"]
