-- Operational (source) schema: the tables the application writes (`orders`, `customers`,
-- `order_items`), prepared for timestamp capture with the triggers of 00-cdc-capture.sql. The one source of this schema: docker-compose mounts
-- this directory, scripts/local-db.sh and the tests apply it. Idempotent.

CREATE TABLE IF NOT EXISTS public.orders (
    id            SERIAL PRIMARY KEY,
    customer_id   INTEGER        NOT NULL,
    product_id    INTEGER        NOT NULL,
    quantity      INTEGER        NOT NULL CHECK (quantity > 0),
    unit_price    NUMERIC(10, 2) NOT NULL CHECK (unit_price >= 0),
    total_amount  NUMERIC(12, 2) GENERATED ALWAYS AS (quantity * unit_price) STORED,
    order_status  VARCHAR(20)    NOT NULL DEFAULT 'pending',
    order_date    TIMESTAMPTZ    NOT NULL DEFAULT now(),
    last_updated  TIMESTAMPTZ    NOT NULL DEFAULT clock_timestamp(),
    created_at    TIMESTAMPTZ    NOT NULL DEFAULT now()
);

-- Timestamp capture reads "changed since the watermark" in (last_updated, id) order.
CREATE INDEX IF NOT EXISTS idx_orders_last_updated ON public.orders (last_updated, id);
CREATE INDEX IF NOT EXISTS idx_orders_customer_id ON public.orders (customer_id);
CREATE INDEX IF NOT EXISTS idx_orders_status ON public.orders (order_status);

-- Full before-images in the logical-replication stream.
ALTER TABLE public.orders REPLICA IDENTITY FULL;

DROP TRIGGER IF EXISTS trg_orders_last_updated ON public.orders;
CREATE TRIGGER trg_orders_last_updated
    BEFORE INSERT OR UPDATE ON public.orders
    FOR EACH ROW EXECUTE FUNCTION public.cdc_touch_last_updated();

-- A delete leaves a tombstone; one pair of triggers, so that the tombstone says whether the
-- deleted state was the deleting transaction's own (it never committed: no version for it).
DROP TRIGGER IF EXISTS trg_orders_tombstone ON public.orders;
CREATE TRIGGER trg_orders_tombstone
    AFTER DELETE ON public.orders
    FOR EACH ROW WHEN (NOT public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete();
CREATE OR REPLACE TRIGGER trg_orders_tombstone_own
    AFTER DELETE ON public.orders
    FOR EACH ROW WHEN (public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete('written_by_deleter');

-- A primary-key change ends the old key: it leaves a tombstone like a delete.
DROP TRIGGER IF EXISTS trg_orders_key_change ON public.orders;
CREATE TRIGGER trg_orders_key_change
    AFTER UPDATE OF id ON public.orders
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id AND NOT public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete();
CREATE OR REPLACE TRIGGER trg_orders_key_change_own
    AFTER UPDATE OF id ON public.orders
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id AND public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete('written_by_deleter');

-- A TRUNCATE is recorded once per statement (row triggers do not fire for it).
DROP TRIGGER IF EXISTS trg_orders_truncate ON public.orders;
CREATE TRIGGER trg_orders_truncate
    AFTER TRUNCATE ON public.orders
    FOR EACH STATEMENT EXECUTE FUNCTION public.cdc_record_truncate();

-- Customers (a uuid key) and order lines (a composite key), captured beside orders. Deleting
-- an order deletes its lines. Each has the same capture triggers as orders (what
-- `extractor setup` installs on any table).
CREATE TABLE IF NOT EXISTS public.customers (
    id            UUID        PRIMARY KEY DEFAULT gen_random_uuid(),
    email         TEXT        NOT NULL,
    full_name     TEXT,
    tier          TEXT        NOT NULL DEFAULT 'standard',
    last_updated  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS public.order_items (
    order_id      INTEGER        NOT NULL REFERENCES public.orders (id) ON DELETE CASCADE ON UPDATE CASCADE,
    line_no       INTEGER        NOT NULL,
    sku           TEXT           NOT NULL,
    quantity      INTEGER        NOT NULL CHECK (quantity > 0),
    unit_price    NUMERIC(10, 2) NOT NULL CHECK (unit_price >= 0),
    last_updated  TIMESTAMPTZ    NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (order_id, line_no)
);
CREATE INDEX IF NOT EXISTS idx_customers_last_updated ON public.customers (last_updated, id);
CREATE INDEX IF NOT EXISTS idx_order_items_last_updated
    ON public.order_items (last_updated, order_id, line_no);
ALTER TABLE public.customers REPLICA IDENTITY FULL;
ALTER TABLE public.order_items REPLICA IDENTITY FULL;

CREATE OR REPLACE TRIGGER trg_customers_last_updated BEFORE INSERT OR UPDATE ON public.customers
    FOR EACH ROW EXECUTE FUNCTION public.cdc_touch_last_updated();
CREATE OR REPLACE TRIGGER trg_customers_tombstone AFTER DELETE ON public.customers
    FOR EACH ROW WHEN (NOT public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete();
CREATE OR REPLACE TRIGGER trg_customers_tombstone_own AFTER DELETE ON public.customers
    FOR EACH ROW WHEN (public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete('written_by_deleter');
CREATE OR REPLACE TRIGGER trg_customers_key_change AFTER UPDATE OF id ON public.customers
    FOR EACH ROW WHEN ((OLD.id) IS DISTINCT FROM (NEW.id) AND NOT public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete();
CREATE OR REPLACE TRIGGER trg_customers_key_change_own AFTER UPDATE OF id ON public.customers
    FOR EACH ROW WHEN ((OLD.id) IS DISTINCT FROM (NEW.id) AND public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete('written_by_deleter');
CREATE OR REPLACE TRIGGER trg_order_items_last_updated BEFORE INSERT OR UPDATE ON public.order_items
    FOR EACH ROW EXECUTE FUNCTION public.cdc_touch_last_updated();
CREATE OR REPLACE TRIGGER trg_order_items_tombstone AFTER DELETE ON public.order_items
    FOR EACH ROW WHEN (NOT public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete();
CREATE OR REPLACE TRIGGER trg_order_items_tombstone_own AFTER DELETE ON public.order_items
    FOR EACH ROW WHEN (public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete('written_by_deleter');
CREATE OR REPLACE TRIGGER trg_order_items_key_change AFTER UPDATE OF order_id, line_no ON public.order_items
    FOR EACH ROW WHEN ((OLD.order_id, OLD.line_no) IS DISTINCT FROM (NEW.order_id, NEW.line_no) AND NOT public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete();
CREATE OR REPLACE TRIGGER trg_order_items_key_change_own AFTER UPDATE OF order_id, line_no ON public.order_items
    FOR EACH ROW WHEN ((OLD.order_id, OLD.line_no) IS DISTINCT FROM (NEW.order_id, NEW.line_no) AND public.cdc_written_here(OLD.xmin))
    EXECUTE FUNCTION public.cdc_record_delete('written_by_deleter');
CREATE OR REPLACE TRIGGER trg_customers_truncate AFTER TRUNCATE ON public.customers
    FOR EACH STATEMENT EXECUTE FUNCTION public.cdc_record_truncate();
CREATE OR REPLACE TRIGGER trg_order_items_truncate AFTER TRUNCATE ON public.order_items
    FOR EACH STATEMENT EXECUTE FUNCTION public.cdc_record_truncate();
