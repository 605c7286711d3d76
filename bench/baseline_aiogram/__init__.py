"""The reference bot for `bench pipeline`: the seed's stack (aiogram 3 + asyncpg) doing what vpnd's
/start and menu buttons do. See bot.py."""
