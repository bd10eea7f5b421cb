"""Code shared by sites and the coordinator.

Python runs this file the first time any ``common`` module is imported, which every
fedlora entry point does before fedlora code loads onnxruntime, Ray or the Hugging Face
hub: so this is where their telemetry and Flower's update check are switched off (see
``common/offline.py``; Flower's own commands import flwr before any fedlora code, so
the processes fedlora starts get the same switches in their environment).
"""

from common.offline import force_offline_environment

force_offline_environment()
