"""Names inside a run directory (output_dir), which every stage, the demo and the report share."""

CONFIG_FILENAME = "config.yaml"  # the resolved config of the run
FINAL_DIR = "final"  # the exported model, in Hugging Face format
