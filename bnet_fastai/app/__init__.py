"""What a user starts: the command line (`cli`), the preflight (`preflight`), the notebooks' live view (`live`),
the BatchNorm notebook's library (`basics`), running the notebooks headless (`notebooks`) and JupyterLab
(`lab`). The top floor: nothing below imports it."""
