"""Configuration: the typed run config (``settings``), its Kubernetes part (``kubernetes``) and the run plan
the validate step hands to every later step (``plan``)."""
