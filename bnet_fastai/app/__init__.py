"""What a user starts: the command line (`cli`), the preflight (`preflight`, its ``ddp`` check in `ddp_check`, a
check's `Result` in `check_result`), the notebooks' live view (`live`), the BatchNorm notebook's library
(`basics`), running the notebooks headless (`notebooks`) and JupyterLab (`lab`). The top floor: nothing below
imports it."""
