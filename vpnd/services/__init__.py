"""Services: the rules of vpnd over the database, shared by every front end (the bot, the CLI)."""
