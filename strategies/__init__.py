"""The Flower strategy that schedules a mobiflower fleet (see DESIGN.md section 2)."""
