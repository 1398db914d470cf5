// The History view: every PNG saved in the server's outputs folder, newest first, a page at a time
// (/api/outputs in server/web.py). Clicking one opens it in the Result view with its parameters.
"use strict";

const HISTORY_PER_PAGE = 24;
const historyPage = { page: 0, pages: 1 };

function historyThumb(item) {
  return thumbButton(item, item.path, () => {
    select(item);
    setView("result");
  });
}

async function loadHistory(page = historyPage.page) {
  try {
    const data = await api(`/api/outputs?page=${page}&per_page=${HISTORY_PER_PAGE}`);
    Object.assign(historyPage, { page: data.page, pages: data.pages });
    $("history").replaceChildren(...data.items.map(historyThumb));
    $("history-empty").hidden = data.total > 0;
    $("history-page").textContent = `page ${data.page + 1} of ${data.pages} · ${data.total} image(s)`;
    $("history-newer").disabled = data.page === 0;
    $("history-older").disabled = data.page + 1 >= data.pages;
  } catch (error) {
    showError(`Could not list the saved images: ${error.message}`);
  }
}

function wireHistory() {
  $("history-newer").addEventListener("click", () => loadHistory(Math.max(0, historyPage.page - 1)));
  $("history-older").addEventListener("click", () => loadHistory(historyPage.page + 1));
  $("history-refresh").addEventListener("click", () => loadHistory());
}

document.addEventListener("DOMContentLoaded", wireHistory);
