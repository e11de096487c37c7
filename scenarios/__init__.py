"""Programs that tell a story end to end through the CLI, for a person to run (`make scenario`); the slow tests
run them too."""
