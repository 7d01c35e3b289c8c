"""The built-in ``heart-disease`` task (FLamby's Fed-Heart-Disease): see ``task.py``.

Installed as the task ``heart-disease`` (entry point group ``cleanroom.tasks``). Its folder is
the task: ``cleanroom.task.load_task("heart-disease")`` digests and imports it like any other.
"""
