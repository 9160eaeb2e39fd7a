"""Reply CloudEvents to --reply_url: a bounded queue over kept-alive connections."""
