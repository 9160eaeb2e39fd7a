BEGIN TRANSACTION;
CREATE TABLE cells (
        truth INTEGER NOT NULL, prediction INTEGER NOT NULL, count INTEGER NOT NULL,
        PRIMARY KEY (truth, prediction)
    ) WITHOUT ROWID;
INSERT INTO "cells" VALUES(0,0,1);
INSERT INTO "cells" VALUES(1,0,1);
INSERT INTO "cells" VALUES(1,1,2);
INSERT INTO "cells" VALUES(2,1,1);
INSERT INTO "cells" VALUES(2,2,2);
INSERT INTO "cells" VALUES(3,3,1);
CREATE TABLE counters (
        name TEXT NOT NULL, label TEXT NOT NULL, value INTEGER NOT NULL,
        PRIMARY KEY (name, label)
    ) WITHOUT ROWID;
INSERT INTO "counters" VALUES('events_accepted','',2);
INSERT INTO "counters" VALUES('events_rejected','invalid_json',1);
INSERT INTO "counters" VALUES('labels','joined',2);
INSERT INTO "counters" VALUES('labels','parked',2);
INSERT INTO "counters" VALUES('logger_events','response',2);
INSERT INTO "counters" VALUES('predicted_rows','',5);
INSERT INTO "counters" VALUES('rows_accepted','',8);
CREATE TABLE custom_values (
        key TEXT NOT NULL, tags TEXT NOT NULL, type TEXT NOT NULL, value REAL NOT NULL,
        PRIMARY KEY (key, tags)
    ) WITHOUT ROWID;
INSERT INTO "custom_values" VALUES('hits','[["shard", "a"]]','COUNTER',2.0);
INSERT INTO "custom_values" VALUES('hits','[["shard", "b"]]','COUNTER',6.0);
INSERT INTO "custom_values" VALUES('temperature','[]','GAUGE',7.5);
CREATE TABLE label_delay (
        bucket INTEGER PRIMARY KEY, count INTEGER NOT NULL, total REAL NOT NULL
    );
INSERT INTO "label_delay" VALUES(2,2,60.0);
CREATE TABLE logged_blocks (
        request_id TEXT NOT NULL, kind TEXT NOT NULL, first_row INTEGER NOT NULL,
        rows INTEGER NOT NULL, codec TEXT NOT NULL, shape BLOB, labelled BLOB,
        data BLOB NOT NULL, PRIMARY KEY (request_id, kind, first_row)
    );
INSERT INTO "logged_blocks" VALUES('r1','response',0,3,'<i8',X'5B5D',X'03',X'010000000000000002000000000000000000000000000000');
INSERT INTO "logged_blocks" VALUES('r2','response',0,2,'<i8',X'5B5D',X'00',X'04000000000000000400000000000000');
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('model_name','m');
INSERT INTO "meta" VALUES('schema_version','3');
CREATE TABLE parked_blocks (
        request_id TEXT NOT NULL, first_row INTEGER NOT NULL, rows INTEGER NOT NULL,
        codec TEXT NOT NULL, shape BLOB, data BLOB NOT NULL, arrived_at REAL NOT NULL,
        expires_at REAL NOT NULL, PRIMARY KEY (request_id, first_row)
    );
INSERT INTO "parked_blocks" VALUES('p1',0,2,'<i8',X'5B5D',X'03000000000000000100000000000000',1700000000.0,1700010000.0);
CREATE TABLE predictions (
        request_id TEXT PRIMARY KEY, request_rows INTEGER NOT NULL,
        predicted_rows INTEGER NOT NULL, predicted_at REAL, waiting INTEGER NOT NULL,
        open INTEGER NOT NULL, expires_at REAL NOT NULL
    ) WITHOUT ROWID;
INSERT INTO "predictions" VALUES('r1',0,3,1699999970.0,1,1,1700010000.0);
INSERT INTO "predictions" VALUES('r2',0,2,1699999995.0,2,1,1700010000.0);
CREATE TABLE seen (
        source TEXT NOT NULL, id TEXT NOT NULL, seen_at REAL NOT NULL,
        PRIMARY KEY (source, id)
    ) WITHOUT ROWID;
INSERT INTO "seen" VALUES('src','1',1700000000.0);
INSERT INTO "seen" VALUES('src','2',1700000000.0);
INSERT INTO "seen" VALUES('src','l1',1700000000.0);
INSERT INTO "seen" VALUES('src','l2',1700000000.0);
CREATE TABLE timer_buckets (
        key TEXT NOT NULL, tags TEXT NOT NULL, bucket INTEGER NOT NULL,
        count INTEGER NOT NULL, total REAL NOT NULL,
        PRIMARY KEY (key, tags, bucket)
    ) WITHOUT ROWID;
INSERT INTO "timer_buckets" VALUES('latency','[]',13,2,0.03);
CREATE INDEX seen_by_time ON seen (seen_at);
CREATE INDEX predictions_by_eviction ON predictions (open, expires_at);
CREATE INDEX predictions_by_expiry ON predictions (expires_at);
CREATE INDEX parked_blocks_by_expiry ON parked_blocks (expires_at);
COMMIT;
