"""The invoice's payment page (``bot_invoice_url``) with its "Pay" button, for the demo."""

from __future__ import annotations

import html

from vpnd_sandbox.cryptopay.records import PAID_BTN_LABELS, StoredInvoice, fmt

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Crypto Pay (sandbox) — {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; background: #f2f4f7; margin: 0; }}
main {{ max-width: 420px; margin: 48px auto; background: #fff; border-radius: 14px; padding: 28px;
        box-shadow: 0 2px 12px rgba(0,0,0,.08); }}
h1 {{ font-size: 18px; margin: 0 0 4px; color: #667; font-weight: 500; }}
.amount {{ font-size: 34px; font-weight: 700; margin: 8px 0 4px; }}
.desc {{ color: #333; margin: 12px 0 20px; white-space: pre-wrap; }}
.status {{ display: inline-block; padding: 3px 10px; border-radius: 10px; font-size: 13px; }}
.active {{ background: #e3f0ff; color: #1565c0; }} .paid {{ background: #e3f7e8; color: #1b7a36; }}
.expired {{ background: #f3e3e3; color: #9a1c1c; }}
button {{ width: 100%; padding: 14px; font-size: 17px; border: 0; border-radius: 10px;
          background: #1f8ef1; color: #fff; cursor: pointer; }}
select {{ width: 100%; padding: 10px; margin-bottom: 12px; font-size: 15px; }}
a.btn {{ display: block; text-align: center; padding: 12px; border-radius: 10px; background: #eef;
         text-decoration: none; margin-top: 12px; }}
small {{ color: #889; }}
</style></head>
<body><main>
<h1>Crypto Pay sandbox · invoice #{invoice_id}</h1>
<div class="amount">{amount}</div>
<span class="status {status}">{status}</span>
<div class="desc">{description}</div>
{action}
<p><small>This is a fake payment page for testing. No money moves.</small></p>
</main></body></html>
"""


def invoice_page(inv: StoredInvoice) -> bytes:
    currency = inv.fiat if inv.currency_type == "fiat" else inv.asset
    if inv.status == "active":
        assets = inv.accepted_assets or (("USDT", "TON") if inv.currency_type == "fiat" else ())
        options = "".join(f'<option value="{html.escape(a)}">{html.escape(a)}</option>' for a in assets)
        chooser = f'<select name="paid_asset">{options}</select>' if options else ""
        action = (
            f'<form method="post" action="/invoice/{html.escape(inv.hash)}/pay">{chooser}'
            f'<button type="submit" id="pay">Pay {html.escape(fmt(inv.amount))} '
            f"{html.escape(str(currency))}</button></form>"
        )
    elif inv.status == "paid":
        action = f"<p>Paid {html.escape(fmt(inv.paid_amount))} {html.escape(str(inv.paid_asset))}.</p>"
        if inv.paid_btn_url:
            label = PAID_BTN_LABELS.get(inv.paid_btn_name or "", "Return")
            action += f'<a class="btn" href="{html.escape(inv.paid_btn_url)}">{html.escape(label)}</a>'
    else:
        action = "<p>This invoice has expired.</p>"
    page = _PAGE.format(
        title=html.escape(inv.hash),
        invoice_id=inv.invoice_id,
        amount=f"{html.escape(fmt(inv.amount))} {html.escape(str(currency))}",
        status=html.escape(inv.status),
        description=html.escape(inv.description or ""),
        action=action,
    )
    return page.encode("utf-8")
