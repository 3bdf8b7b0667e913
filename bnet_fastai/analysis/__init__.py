"""Reading run folders: the report (`report`), its statistics (`stats`), budget studies (`budget`), figures
(`plots`) and the Markdown tables the docs publish (`markdown`). Builds on `runs`."""
