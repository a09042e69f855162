"""The top layer: the `berth` command, the demo and its report. It may import every stage; nothing imports it."""
