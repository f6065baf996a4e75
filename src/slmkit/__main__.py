from slmkit.cli import entry

entry()
