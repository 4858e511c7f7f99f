from ccos_obsd.cli import entrypoint

if __name__ == "__main__":  # not when a spawned worker process imports it
    entrypoint()
