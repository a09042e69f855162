"""The shipped YAML configs, installed as package data of `berth.configs` (see berth.core.configs)."""
