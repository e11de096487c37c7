"""The tlops pipeline: its DAG, compilation to IR YAML, and the local (kfp.local) runner."""
