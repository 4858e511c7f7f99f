from ccos_obsd.cli import entrypoint

entrypoint()
