-- Live adoption of a duroxide-pg 0.1.38 deployment (src/adopt.rs, migrations/adoption/).
-- Present in every schema and empty unless this schema holds the data of an adopted
-- duroxide-pg schema. The functions and triggers that reach into the duroxide-pg schema are
-- not migrations (they name that schema): migrations/adoption/install.sql installs them,
-- finalize removes them.

-- The duroxide-pg schema this schema adopts (at most one row).
CREATE TABLE adoption_source (
    singleton          BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    source_schema      TEXT NOT NULL,
    -- revision of migrations/adoption/install.sql installed (newer binaries re-install)
    install_revision   INT NOT NULL,
    started_at_ms      BIGINT NOT NULL,
    finalized_at_ms    BIGINT
);

-- Instances moved out of the duroxide-pg tables. Messages that duroxide-pg processes still
-- write for them are routed here by a trigger on duroxide-pg's orchestrator queue.
CREATE TABLE adopted_instances (
    instance_id     TEXT PRIMARY KEY,
    adopted_at_ms   BIGINT NOT NULL
);
