"""The one schema of the bot's SQLite file, as migrations: version N is SCHEMA[N-1].

Never edit a shipped version; append a new one (Database runs what a file lacks). Mark it
Additive when the code of the version before still works on it (bot/storage/sql.py).
Columns of note:
  events.state        pending / working / done / failed (see bot/storage/queue.py)
  events.sending      the part whose send is under way or in doubt; sending_since: when it was
                      first tried (our clock), where the look for it starts
  events.attempts     claims so far; events.deaths: how many of them ended with their owner dead
                      (a lease run out, a takeover) - the rest ended in an error or are under way
  mirror.author       user, bot (its own replies), human (a person or another app on the Page's side)
  users.synced_at     when Graph history was last imported into the mirror
  users.reset_at_ms   history up to this moment is left out of prompts (the user wrote RESET_WORD)
  users.paused_until  a human answered from the Page: the bot stays silent until then
  users.thread_back_ms  Meta's time of the last thread the Page inbox passed back to the bot
  users.thread_away   the account (Page or Instagram) that passed the user's thread to the Page inbox
                      (HANDOFF_THREAD_CONTROL); NULL once it is the bot's again. thread_away_ms: when
                      (our clock). thread_take_at: when a take-back may next be tried (a host's claim
                      on it, or a wait after a failure; NULL: now)
  events.restarts     claims that died with the whole bot (another gunicorn master start): counted
                      apart from deaths, with a larger bound
  users.disclosed_at  when the bot last said it is one (bot/replies/meta_rules.py)
  mirror.reaction     the user's reaction to that message (an emoji), if any
  interactions.reply_mids / feedback  the mids of the reply's parts (JSON), and the user's
                      "Good response" / "Bad response" on it (response_feedback)
  interactions.tracking  NULL: not sent anywhere; 'waiting' for TRACKING_URL; 'sent'
  interactions.history   mirror, graph, or mirror-only (Graph could not be read in time)
  interactions.attachments  JSON list of [kind, bytes, outcome] per attachment (bot/media/prepare.py)
  answer_cache        ANSWER_CACHE_TTL: model answers by a hash of the whole request
  graph_budgets.next_at  the earliest moment of the next Conversations API read of that Page or
                        Instagram account (all processes)
  interactions.page_id   the Page or Instagram account the exchange was with
  interactions.channel   messenger, instagram or web; ip_address and user_url: a web turn's (tracking)
  webchat_conversations  the website chat's conversations: ids the server issued; user_key for a
                        signed user id (HMAC, never the id itself); label: the client's unsigned user_id
  webchat_reservations  tokens the website chat's answers in progress hold against the daily token caps
                      (bot/webchat/store.py), until each is logged, or RESERVATION_S at most
  webchat_counters    the website chat's limits: requests per key (ip, conversation) in a window from its first
  knowledge_sources   the knowledge base's sources (bot/knowledge/): a file or web page, per Page
                      ('' = every Page), with the hash of its content and the model its chunks were
                      embedded with (NULL: none) - re-adding it unchanged changes nothing
  knowledge_chunks    their chunks, each with its embedding (float32, normalised; NULL: none), the same
                      as int8s (embedding_i8, what searches compare; NULL: none, or added by older code) and,
                      on SQLite, a row in the full-text index knowledge_fts (bot/knowledge/store.py keeps it)
  knowledge_version   bumped by every change, so each process reloads its in-memory vectors
  knowledge_chunks.tsv, .words  (PostgreSQL only) the chunk's words as search reads them (SEARCH_TEXT,
                      English lexemes; a GIN index, its pending list kept short) and how many words it has
                      (bm25's length)
  knowledge_terms     (PostgreSQL only) how many chunks hold each word (its English lexeme), for search
  knowledge_translations  bilingual dictionaries (`knowledge dictionary add`): a word of another
                      language, folded (lower case, no accents), and its translations; full-text
                      search adds them for a question's words the knowledge base does not hold
  interactions.knowledge  JSON list of [chunk id, score] the answer's prompt carried
  inbox_offsets       bytes of each inbox file already in `events` (bot/storage/inbox.py);
                      damaged: bytes skipped as damage (such a file is quarantined, not deleted)
  dead_letters        records or messages that could not enter the queue, kept for a person
  unsent              mids of messages their users unsent (Instagram's is_deleted), and when (ms): one
                      still waiting, or stored later, is finished unanswered (bot/storage/edits.py)
  edited              the latest text of each message its user edited, and when (ms): one still
                      waiting, or stored later, is answered with it (bot/storage/edits.py); by
                      user and mid, so an edit naming another user's message changes nothing
"""
from bot.storage.sql import Additive

# Without them each retention pass read the mirror and the finished queue rows whole, also when
# there was nothing to delete (bench/retention.py). The same SQL for both databases.
RETENTION_INDEXES = Additive("""
    CREATE INDEX mirror_time ON mirror (at_ms);
    CREATE INDEX events_finished ON events (finished_at) WHERE finished_at IS NOT NULL;
    """)
TRANSLATIONS = Additive("""
    CREATE TABLE knowledge_translations (word TEXT NOT NULL, dictionary TEXT NOT NULL, words TEXT NOT NULL,
                                         PRIMARY KEY (word, dictionary));
    CREATE INDEX knowledge_translations_dictionary ON knowledge_translations (dictionary);
    """)
# Each chunk's vector as int8s (bot/knowledge/embeddings.py's to_int8), made when it is added:
# searches compare these, loaded at a quarter of float32's bytes and not converted at each load.
# Additive: older code adds chunks without them, and a search makes them for such rows
# (bot/knowledge/retrieval.py), once.
EMBEDDING_INT8 = "ALTER TABLE knowledge_chunks ADD COLUMN embedding_i8 {};"

SCHEMA = [
    # version 1: the delivery queue
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dedupe_key TEXT NOT NULL UNIQUE,
        psid TEXT NOT NULL,
        message TEXT NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        received_at REAL NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        available_at REAL NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        batch_id INTEGER,
        owner TEXT,
        lease_until REAL,
        reply TEXT,
        sent_parts INTEGER NOT NULL DEFAULT 0,
        finished_at REAL,
        error TEXT
    );
    CREATE INDEX events_open ON events (state, psid, timestamp_ms, id);
    CREATE INDEX events_queue ON events (state, id);
    CREATE INDEX events_batch ON events (batch_id);
    """,
    # version 2: dispatchers say they are alive, for /healthz
    """
    CREATE TABLE dispatchers (owner TEXT PRIMARY KEY, seen_at REAL NOT NULL);
    """,
    # version 3: the conversation store - the mirror of every message, what the bot
    # knows of each user, one record per exchange, the shared Graph read budget
    """
    CREATE INDEX events_user ON events (psid, timestamp_ms);
    CREATE TABLE mirror (
        mid TEXT PRIMARY KEY,
        psid TEXT NOT NULL,
        author TEXT NOT NULL,
        text TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX mirror_user ON mirror (psid, at_ms);
    CREATE TABLE users (
        psid TEXT PRIMARY KEY,
        synced_at REAL,
        reset_at_ms INTEGER,
        paused_until REAL,
        rate_notice_at REAL,
        budget_notice_day TEXT
    );
    CREATE TABLE interactions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        psid TEXT NOT NULL,
        user_message TEXT NOT NULL,
        user_timestamp INTEGER NOT NULL,
        bot_message TEXT,
        bot_timestamp INTEGER,
        model TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        total_tokens INTEGER,
        latency_ms INTEGER,
        outcome TEXT NOT NULL,
        tracking TEXT,
        track_attempts INTEGER NOT NULL DEFAULT 0,
        track_after REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX interactions_time ON interactions (user_timestamp);
    CREATE INDEX interactions_user ON interactions (psid, user_timestamp);
    CREATE INDEX interactions_tracking ON interactions (tracking, track_after);
    CREATE TABLE graph_budget (id INTEGER PRIMARY KEY CHECK (id = 1), next_at REAL NOT NULL);
    """,
    # version 4: how far the reply process has read each webhook process's inbox file
    """
    CREATE TABLE inbox_offsets (source TEXT PRIMARY KEY, offset INTEGER NOT NULL);
    """,
    # version 5: nothing read from an inbox is dropped quietly
    """
    ALTER TABLE inbox_offsets ADD COLUMN damaged INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        offset INTEGER NOT NULL,
        error TEXT NOT NULL,
        payload BLOB NOT NULL,
        at REAL NOT NULL
    );
    """,
    # version 6: where each answer's history came from, and the shared answer cache
    """
    ALTER TABLE interactions ADD COLUMN history TEXT;
    CREATE TABLE answer_cache (key TEXT PRIMARY KEY, text TEXT NOT NULL, model TEXT, expires_at REAL NOT NULL);
    CREATE INDEX answer_cache_expiry ON answer_cache (expires_at);
    """,
    # version 7: the Send API call under way, for a takeover to check before sending again
    """
    ALTER TABLE events ADD COLUMN sending INTEGER;
    """,
    # version 8: the kinds, sizes and fates of the attachments an exchange answered (never their content)
    """
    ALTER TABLE interactions ADD COLUMN attachments TEXT;
    """,
    # version 9: several Pages and Instagram accounts: a read budget each, the account of each exchange
    """
    CREATE TABLE graph_budgets (account TEXT PRIMARY KEY, next_at REAL NOT NULL);
    DROP TABLE graph_budget;
    ALTER TABLE interactions ADD COLUMN page_id TEXT;
    CREATE INDEX interactions_page ON interactions (page_id, user_timestamp);
    """,
    # version 10: when the bot last said it is a bot (Meta's disclosure rule)
    """
    ALTER TABLE users ADD COLUMN disclosed_at REAL;
    """,
    # version 11: the website chat (bot/webchat/): each exchange's channel, a web turn's address and
    # page, the conversations the server issued, and the counters of its limits
    """
    ALTER TABLE interactions ADD COLUMN channel TEXT NOT NULL DEFAULT 'messenger';
    ALTER TABLE interactions ADD COLUMN ip_address TEXT;
    ALTER TABLE interactions ADD COLUMN user_url TEXT;
    CREATE INDEX interactions_channel ON interactions (channel, user_timestamp);
    CREATE TABLE webchat_conversations (
        id TEXT PRIMARY KEY,
        user_key TEXT UNIQUE,
        label TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE webchat_counters (key TEXT PRIMARY KEY, window_start REAL NOT NULL, count INTEGER NOT NULL);
    """,
    # version 12: what users do to messages after sending them: reactions (mirror), and feedback
    # on the bot's replies, kept with the exchange whose reply it rates (its parts' mids)
    """
    ALTER TABLE mirror ADD COLUMN reaction TEXT;
    ALTER TABLE interactions ADD COLUMN reply_mids TEXT;
    ALTER TABLE interactions ADD COLUMN feedback TEXT;
    """,
    # version 13: the knowledge base (bot/knowledge/); full text by FTS5 (porter stemming)
    """
    CREATE TABLE knowledge_sources (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        page_id TEXT NOT NULL DEFAULT '',
        location TEXT NOT NULL,
        title TEXT NOT NULL,
        url TEXT,
        kind TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        embedding_model TEXT,
        chunks INTEGER NOT NULL,
        added_at REAL NOT NULL,
        UNIQUE (page_id, location)
    );
    CREATE TABLE knowledge_chunks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        source_id INTEGER NOT NULL,
        page_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        heading TEXT NOT NULL,
        text TEXT NOT NULL,
        embedding BLOB,
        embedding_model TEXT
    );
    CREATE INDEX knowledge_chunks_source ON knowledge_chunks (source_id);
    CREATE INDEX knowledge_chunks_page ON knowledge_chunks (page_id);
    CREATE VIRTUAL TABLE knowledge_fts USING fts5(heading, text, content='knowledge_chunks', content_rowid='id',
                                                  tokenize='porter unicode61 remove_diacritics 2');
    CREATE TABLE knowledge_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
    INSERT INTO knowledge_version (id, version) VALUES (1, 0);
    ALTER TABLE interactions ADD COLUMN knowledge TEXT;
    """,
    # version 14: when the Page inbox last passed the thread back (Meta's time): a person's answer
    # from before it, delivered after it, must not pause the bot again
    """
    ALTER TABLE users ADD COLUMN thread_back_ms INTEGER;
    """,
    # version 15: when the send under way was first tried: the look for it after a crash or a
    # send in doubt starts there, so a Page message sent before it is never taken for it
    """
    ALTER TABLE events ADD COLUMN sending_since REAL;
    """,
    # version 16: deaths counted apart from errors, so each has its own bound (bot/storage/queue.py).
    # Rows in flight at the upgrade start at 0: their earlier deaths stay in attempts (as errors)
    """
    ALTER TABLE events ADD COLUMN deaths INTEGER NOT NULL DEFAULT 0;
    """,
    # version 17: a thread the bot passed to the Page inbox, and when (our clock, ms), taken back
    # when the pause ends without a handback (bot/replies/threads.py); deaths with the whole bot
    # counted apart (events.restarts, bot/storage/queue.py's take_over)
    """
    ALTER TABLE users ADD COLUMN thread_away TEXT;
    ALTER TABLE users ADD COLUMN thread_away_ms INTEGER;
    ALTER TABLE users ADD COLUMN thread_take_at REAL;
    ALTER TABLE events ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX users_thread_away ON users (psid) WHERE thread_away IS NOT NULL;
    """,
    # version 18: when each reply process last made progress (finished a message, or was told by
    # Meta to hold it), with its heartbeat: /readyz tells a bot working through a backlog from one
    # that answers nothing (bot/web/readiness.py);
    # the oldest schema version whose code may use this file (bot/storage/sql.py's Additive)
    Additive("""
    ALTER TABLE dispatchers ADD COLUMN progress_at REAL;
    CREATE TABLE schema_compat (min_code_version INTEGER NOT NULL);
    CREATE TABLE webchat_reservations (request_id TEXT PRIMARY KEY, client TEXT NOT NULL, tokens INTEGER NOT NULL,
                                       at REAL NOT NULL);
    CREATE INDEX webchat_reservations_client ON webchat_reservations (client);
    """),
    # version 19: the messages users unsent (Instagram), so one stored after its unsend is not answered
    Additive("""
    CREATE TABLE unsent (mid TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
    """),
    # version 20: the messages users edited, so one stored after its edit is answered as edited
    Additive("""
    CREATE TABLE edited (psid TEXT NOT NULL, mid TEXT NOT NULL, text TEXT NOT NULL, at_ms INTEGER NOT NULL,
                         PRIMARY KEY (psid, mid));
    """),
    # version 21: retention finds old mirror rows and finished queue rows by index
    RETENTION_INDEXES,
    # version 22: bilingual dictionaries for full-text search in other languages (bot/knowledge/dictionary.py)
    TRANSLATIONS,
    # version 23: each chunk's vector as int8s too, what searches compare
    Additive(EMBEDDING_INT8.format("BLOB")),
]
# PostgreSQL's full text reads a chunk as SQLite's FTS5 tokenizer does (unicode61,
# remove_diacritics) and as a question's words are folded (bot/knowledge/retrieval.py): without
# accents ("café" is "cafe") and split at every punctuation mark. PostgreSQL's own parser keeps
# "3.50", "gluten-free", "shop.anasbakery.example" and "info@…" whole, which no question's word
# matches (README: with it, hybrid hit@3 on the example questions was 0.87, SQLite's 0.90).
# [:punct:], not [^[:alnum:]]: under a C collation the latter would split "straße" too.
# normalize() needs a UTF8 database: the start refuses any other (bot/runtime/preflight.py).
SEARCH_TEXT = ("regexp_replace(regexp_replace(normalize(heading || ' ' || text, NFKD), E'[\\u0300-\\u036f]', '', 'g'),"
               " '[[:punct:]]+', ' ', 'g')")

# The same tables in PostgreSQL (DATABASE_URL), as its own list of migrations: version N
# is POSTGRES_SCHEMA[N-1], kept in table schema_version. The mirror's `rowid` column
# gives the insertion order SQLite's implicit rowid gives. inbox_offsets is SQLite's
# alone: with PostgreSQL the webhooks write straight to `events`.
POSTGRES_SCHEMA = [
    # version 1: everything SQLite's versions 1-5 hold
    """
    CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        dedupe_key TEXT NOT NULL UNIQUE,
        psid TEXT NOT NULL,
        message TEXT NOT NULL,
        timestamp_ms BIGINT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending',
        available_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        batch_id BIGINT,
        owner TEXT,
        lease_until DOUBLE PRECISION,
        reply TEXT,
        sent_parts INTEGER NOT NULL DEFAULT 0,
        finished_at DOUBLE PRECISION,
        error TEXT
    );
    CREATE INDEX events_open ON events (state, psid, timestamp_ms, id);
    CREATE INDEX events_queue ON events (state, id);
    CREATE INDEX events_batch ON events (batch_id);
    CREATE INDEX events_user ON events (psid, timestamp_ms);
    CREATE TABLE dispatchers (owner TEXT PRIMARY KEY, seen_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE mirror (
        rowid BIGSERIAL,
        mid TEXT PRIMARY KEY,
        psid TEXT NOT NULL,
        author TEXT NOT NULL,
        text TEXT NOT NULL,
        at_ms BIGINT NOT NULL
    );
    CREATE INDEX mirror_user ON mirror (psid, at_ms);
    CREATE TABLE users (
        psid TEXT PRIMARY KEY,
        synced_at DOUBLE PRECISION,
        reset_at_ms BIGINT,
        paused_until DOUBLE PRECISION,
        rate_notice_at DOUBLE PRECISION,
        budget_notice_day TEXT
    );
    CREATE TABLE interactions (
        id BIGSERIAL PRIMARY KEY,
        psid TEXT NOT NULL,
        user_message TEXT NOT NULL,
        user_timestamp BIGINT NOT NULL,
        bot_message TEXT,
        bot_timestamp BIGINT,
        model TEXT,
        prompt_tokens BIGINT,
        completion_tokens BIGINT,
        total_tokens BIGINT,
        latency_ms BIGINT,
        outcome TEXT NOT NULL,
        tracking TEXT,
        track_attempts INTEGER NOT NULL DEFAULT 0,
        track_after DOUBLE PRECISION NOT NULL DEFAULT 0
    );
    CREATE INDEX interactions_time ON interactions (user_timestamp);
    CREATE INDEX interactions_user ON interactions (psid, user_timestamp);
    CREATE INDEX interactions_tracking ON interactions (tracking, track_after);
    CREATE TABLE graph_budget (id INTEGER PRIMARY KEY CHECK (id = 1), next_at DOUBLE PRECISION NOT NULL);
    CREATE TABLE inbox_offsets (source TEXT PRIMARY KEY, "offset" BIGINT NOT NULL, damaged BIGINT NOT NULL DEFAULT 0);
    CREATE TABLE dead_letters (
        id BIGSERIAL PRIMARY KEY,
        source TEXT NOT NULL,
        "offset" BIGINT NOT NULL,
        error TEXT NOT NULL,
        payload BYTEA NOT NULL,
        at DOUBLE PRECISION NOT NULL
    );
    """,
    # version 2: as SQLite's version 6
    """
    ALTER TABLE interactions ADD COLUMN history TEXT;
    CREATE TABLE answer_cache (key TEXT PRIMARY KEY, text TEXT NOT NULL, model TEXT,
                               expires_at DOUBLE PRECISION NOT NULL);
    CREATE INDEX answer_cache_expiry ON answer_cache (expires_at);
    """,
    # version 3: as SQLite's version 7
    """
    ALTER TABLE events ADD COLUMN sending INTEGER;
    """,
    # version 4: as SQLite's version 8
    """
    ALTER TABLE interactions ADD COLUMN attachments TEXT;
    """,
    # version 5: as SQLite's version 9
    """
    CREATE TABLE graph_budgets (account TEXT PRIMARY KEY, next_at DOUBLE PRECISION NOT NULL);
    DROP TABLE graph_budget;
    ALTER TABLE interactions ADD COLUMN page_id TEXT;
    CREATE INDEX interactions_page ON interactions (page_id, user_timestamp);
    """,
    # version 6: as SQLite's version 10
    """
    ALTER TABLE users ADD COLUMN disclosed_at DOUBLE PRECISION;
    """,
    # version 7: as SQLite's version 11
    """
    ALTER TABLE interactions ADD COLUMN channel TEXT NOT NULL DEFAULT 'messenger';
    ALTER TABLE interactions ADD COLUMN ip_address TEXT;
    ALTER TABLE interactions ADD COLUMN user_url TEXT;
    CREATE INDEX interactions_channel ON interactions (channel, user_timestamp);
    CREATE TABLE webchat_conversations (
        id TEXT PRIMARY KEY,
        user_key TEXT UNIQUE,
        label TEXT,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE webchat_counters (key TEXT PRIMARY KEY, window_start DOUBLE PRECISION NOT NULL,
                                   count BIGINT NOT NULL);
    """,
    # version 8: as SQLite's version 12
    """
    ALTER TABLE mirror ADD COLUMN reaction TEXT;
    ALTER TABLE interactions ADD COLUMN reply_mids TEXT;
    ALTER TABLE interactions ADD COLUMN feedback TEXT;
    """,
    # version 9: as SQLite's version 13; full text by PostgreSQL's own (English stemming, as
    # SQLite's porter tokenizer) in a generated column with a GIN index
    """
    CREATE TABLE knowledge_sources (
        id BIGSERIAL PRIMARY KEY,
        page_id TEXT NOT NULL DEFAULT '',
        location TEXT NOT NULL,
        title TEXT NOT NULL,
        url TEXT,
        kind TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        embedding_model TEXT,
        chunks INTEGER NOT NULL,
        added_at DOUBLE PRECISION NOT NULL,
        UNIQUE (page_id, location)
    );
    CREATE TABLE knowledge_chunks (
        id BIGSERIAL PRIMARY KEY,
        source_id BIGINT NOT NULL,
        page_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        heading TEXT NOT NULL,
        text TEXT NOT NULL,
        embedding BYTEA,
        embedding_model TEXT,
        tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', heading || ' ' || text)) STORED
    );
    CREATE INDEX knowledge_chunks_source ON knowledge_chunks (source_id);
    CREATE INDEX knowledge_chunks_page ON knowledge_chunks (page_id);
    CREATE INDEX knowledge_chunks_tsv ON knowledge_chunks USING GIN (tsv);
    CREATE TABLE knowledge_version (id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
    INSERT INTO knowledge_version (id, version) VALUES (1, 0);
    ALTER TABLE interactions ADD COLUMN knowledge TEXT;
    """,
    # version 10: SQLite's 14
    """
    ALTER TABLE users ADD COLUMN thread_back_ms BIGINT;
    """,
    # version 11: SQLite's 15
    """
    ALTER TABLE events ADD COLUMN sending_since DOUBLE PRECISION;
    """,
    # version 12: SQLite's 16
    """
    ALTER TABLE events ADD COLUMN deaths INTEGER NOT NULL DEFAULT 0;
    """,
    # version 13: SQLite's 17, and the export's index (SQLite's interactions_time holds the rowid already)
    """
    ALTER TABLE users ADD COLUMN thread_away TEXT;
    ALTER TABLE users ADD COLUMN thread_away_ms BIGINT;
    ALTER TABLE users ADD COLUMN thread_take_at DOUBLE PRECISION;
    ALTER TABLE events ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX interactions_time_id ON interactions (user_timestamp, id);
    CREATE INDEX users_thread_away ON users (psid) WHERE thread_away IS NOT NULL;
    """,
    # version 14: SQLite's 18
    Additive("""
    ALTER TABLE dispatchers ADD COLUMN progress_at DOUBLE PRECISION;
    ALTER TABLE schema_version ADD COLUMN min_code_version INTEGER;
    CREATE TABLE webchat_reservations (request_id TEXT PRIMARY KEY, client TEXT NOT NULL, tokens BIGINT NOT NULL,
                                       at DOUBLE PRECISION NOT NULL);
    CREATE INDEX webchat_reservations_client ON webchat_reservations (client);
    """),
    # version 15: SQLite's 19
    Additive("""
    CREATE TABLE unsent (mid TEXT PRIMARY KEY, at_ms BIGINT NOT NULL);
    """),
    # version 16: SQLite's 20
    Additive("""
    CREATE TABLE edited (psid TEXT NOT NULL, mid TEXT NOT NULL, text TEXT NOT NULL, at_ms BIGINT NOT NULL,
                         PRIMARY KEY (psid, mid));
    """),
    # version 17: SQLite's 21
    RETENTION_INDEXES,
    # version 18: SQLite's 22
    TRANSLATIONS,
    # version 19 (PostgreSQL's own): how many chunks hold each word, kept as chunks come and go
    # (bot/knowledge/store.py): PostgreSQL would count them from the rows, thousands for a common
    # word, where SQLite's FTS5 counts from its index. Not additive: older code adds chunks without
    # counting them. The chunks are held still while they are counted.
    """
    CREATE TABLE knowledge_terms (lexeme TEXT PRIMARY KEY, chunks INTEGER NOT NULL);
    LOCK TABLE knowledge_chunks IN SHARE MODE;
    INSERT INTO knowledge_terms (lexeme, chunks) SELECT word, ndoc FROM ts_stat('SELECT tsv FROM knowledge_chunks');
    """,
    # version 20 (PostgreSQL's own): the chunks' words as SQLite's FTS5 reads them, and how many
    # (bm25's length). Additive: older code reads and counts the new column as it did the old.
    Additive(f"""
    ALTER TABLE knowledge_chunks DROP COLUMN tsv;
    ALTER TABLE knowledge_chunks ADD COLUMN tsv tsvector
        GENERATED ALWAYS AS (to_tsvector('english', {SEARCH_TEXT})) STORED;
    ALTER TABLE knowledge_chunks ADD COLUMN words INTEGER
        GENERATED ALWAYS AS (COALESCE(array_length(
            array_remove(regexp_split_to_array({SEARCH_TEXT}, '\\s+'), ''), 1), 0)) STORED;
    CREATE INDEX knowledge_chunks_tsv ON knowledge_chunks USING GIN (tsv);
    DELETE FROM knowledge_terms;
    INSERT INTO knowledge_terms (lexeme, chunks) SELECT word, ndoc FROM ts_stat('SELECT tsv FROM knowledge_chunks');
    """),
    # version 21 (PostgreSQL's own): a short pending list for the full-text index. GIN parks an
    # added chunk's words in a list of pending entries, up to 4 MB, that every search reads
    # through, whole, until a vacuum folds it in. Bounded at 64 kB (the least), a large add folds
    # it in as it goes. Measured after adding 20,000 chunks (docs/benchmarks.md, "Teach the
    # bot your business"): the full-text step 0.86-0.88x at p50 and p95, the ingest 0.95x;
    # fastupdate off did no better for searches and cost the ingest 0.71x. Additive: no code
    # reads the option.
    Additive("""
    ALTER INDEX knowledge_chunks_tsv SET (gin_pending_list_limit = 64);
    SELECT gin_clean_pending_list('knowledge_chunks_tsv');
    """),
    # version 22: SQLite's 23
    Additive(EMBEDDING_INT8.format("BYTEA")),
]
