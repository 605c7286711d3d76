"""`python -m bench.baseline_aiogram --api URL --token T --dsn DSN`: run the reference bot until SIGTERM."""

from bench.baseline_aiogram.bot import main

if __name__ == "__main__":
    main()
