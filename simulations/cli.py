def main():
    from mobiflower.platform import _probe
    print("ok", _probe.X)
