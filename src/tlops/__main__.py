from tlops.cli import entry

entry()
