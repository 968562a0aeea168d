"""The device side of mobiflower: a forward-only runtime, local inference, and (later) the Flower ClientApp."""
