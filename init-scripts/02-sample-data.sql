-- Sample orders so that a fresh pipeline has history to show at once. Inserted only into an
-- empty table, so re-applying the init scripts adds nothing.
INSERT INTO public.orders (customer_id, product_id, quantity, unit_price, order_status, order_date)
SELECT v.customer_id, v.product_id, v.quantity, v.unit_price, v.order_status,
       now() - v.age
FROM (VALUES
    (1001, 501, 2,  29.99, 'pending',    interval '2 days'),
    (1002, 502, 1, 149.50, 'confirmed',  interval '1 day 20 hours'),
    (1003, 503, 5,   9.95, 'shipped',    interval '1 day 6 hours'),
    (1004, 504, 3,  45.00, 'delivered',  interval '1 day'),
    (1005, 505, 1, 999.99, 'pending',    interval '20 hours'),
    (1006, 506, 4,  12.25, 'confirmed',  interval '12 hours'),
    (1007, 507, 2,  75.10, 'shipped',    interval '6 hours'),
    (1008, 508, 7,   3.49, 'cancelled',  interval '3 hours'),
    (1009, 509, 1, 250.00, 'pending',    interval '1 hour'),
    (1010, 510, 6,  18.75, 'confirmed',  interval '10 minutes')
) AS v(customer_id, product_id, quantity, unit_price, order_status, age)
WHERE NOT EXISTS (SELECT 1 FROM public.orders);

-- A few customers and order lines, likewise only into empty tables.
INSERT INTO public.customers (id, email, full_name, tier)
SELECT v.id::uuid, v.email, v.full_name, v.tier
FROM (VALUES
    ('0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0001', 'ada@example.com',   'Ada Lovelace',   'gold'),
    ('0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0002', 'alan@example.com',  'Alan Turing',    'standard'),
    ('0f8b1f3e-3c0c-4d7e-9a51-1d2f1b7a0003', 'grace@example.com', 'Grace Hopper',   'silver')
) AS v(id, email, full_name, tier)
WHERE NOT EXISTS (SELECT 1 FROM public.customers);
INSERT INTO public.order_items (order_id, line_no, sku, quantity, unit_price)
SELECT o.id, l.line_no, 'SKU-' || o.product_id || '-' || l.line_no, o.quantity, o.unit_price
FROM public.orders o CROSS JOIN generate_series(1, 2) AS l(line_no)
WHERE NOT EXISTS (SELECT 1 FROM public.order_items);
