/* Opulon's cookie banner. Served by the gateway itself, and only on pages of a site with an
   analytics ID configured. Nothing of Google's or Meta's loads until the visitor accepts:
   Google's Consent Mode defaults are set to denied first, the choice is kept in the
   first-party cookie opulon_consent (__Host-opulon_consent over https, which no other host
   can set), and Global Privacy Control or Do Not Track is a refusal.
   The page's Content-Security-Policy admits these tags' hosts only when they are configured. */
(function () {
  "use strict";

  var banner = document.getElementById("consent");
  if (!banner) {
    return;
  }
  var self = document.currentScript;
  var nonce = self ? self.nonce || self.getAttribute("nonce") || "" : "";
  var config = banner.dataset;
  var COOKIE = (location.protocol === "https:" ? "__Host-" : "") + "opulon_consent";
  var KEEP_SECONDS = 180 * 24 * 3600;
  var GOOGLE = "https://www.googletagmanager.com/";
  var PIXEL = "https://connect.facebook.net/en_US/fbevents.js";
  var google = Boolean(config.gtm || config.ga4);
  var refused =
    config.refused ||
    (navigator.globalPrivacyControl === true ? "gpc" : "") ||
    (navigator.doNotTrack === "1" || window.doNotTrack === "1" ? "dnt" : "");
  var loaded = {};

  // Consent Mode: every signal denied before any Google tag can run.
  window.dataLayer = window.dataLayer || [];
  function gtag() {
    window.dataLayer.push(arguments);
  }
  function signal(granted) {
    return granted ? "granted" : "denied";
  }
  function consentSignals(choice) {
    return {
      ad_storage: signal(choice.marketing),
      ad_user_data: signal(choice.marketing),
      ad_personalization: signal(choice.marketing),
      analytics_storage: signal(choice.analytics),
      functionality_storage: "denied",
      personalization_storage: "denied",
      security_storage: "granted"
    };
  }
  if (google) {
    var defaults = consentSignals({ analytics: false, marketing: false });
    defaults.wait_for_update = 500;
    gtag("consent", "default", defaults);
    gtag("set", "ads_data_redaction", true);
  }

  // -- the stored choice: "v1.a1m0.<tags>", for the tags configured when it was made ------

  // More than one cookie of the name (one set for a parent domain, say) is no choice at all.
  function readChoice() {
    var values = document.cookie.split(";").map(function (part) {
      return part.trim();
    }).filter(function (part) {
      return part.indexOf(COOKIE + "=") === 0;
    });
    var match = values.length === 1 && /=v1\.a([01])m([01])\.([0-9a-f]+)$/.exec(values[0]);
    if (!match || match[3] !== config.tags) {
      return null;
    }
    return { analytics: match[1] === "1", marketing: match[2] === "1" };
  }

  function storeChoice(choice) {
    var value = "v1.a" + (choice.analytics ? 1 : 0) + "m" + (choice.marketing ? 1 : 0);
    document.cookie =
      COOKIE + "=" + value + "." + config.tags + "; Path=/; Max-Age=" + KEEP_SECONDS +
      "; SameSite=Lax" + (location.protocol === "https:" ? "; Secure" : "");
  }

  // The cookies Google's and Meta's tags set on this site, removed for each purpose refused.
  function forgetTagCookies(choice) {
    var pattern = [];
    if (!choice.analytics) {
      pattern.push("_ga", "_gid", "_gat");
    }
    if (!choice.marketing) {
      pattern.push("_gcl_", "_fbp$", "_fbc$");
    }
    if (!pattern.length) {
      return;
    }
    var forget = new RegExp("^(" + pattern.join("|") + ")");
    var names = document.cookie.split(";").map(function (part) {
      return part.split("=")[0].trim();
    });
    var labels = location.hostname.split(".");
    var domains = [""];
    for (var i = 0; i < labels.length - 1; i++) {
      domains.push("; Domain=" + labels.slice(i).join("."));
    }
    names.forEach(function (name) {
      if (forget.test(name)) {
        domains.forEach(function (domain) {
          document.cookie = name + "=; Max-Age=0; Path=/" + domain;
        });
      }
    });
  }

  // -- the tags, added only after consent --------------------------------------------------

  function addScript(src) {
    var script = document.createElement("script");
    script.async = true;
    script.src = src;
    if (nonce) {
      script.setAttribute("nonce", nonce);  // Tag Manager hands it on to what it injects
    }
    document.head.appendChild(script);
  }

  function pixelQueue() {
    if (!window.fbq) {
      var fbq = function () {
        if (fbq.callMethod) {
          fbq.callMethod.apply(fbq, arguments);
        } else {
          fbq.queue.push(arguments);
        }
      };
      fbq.push = fbq;
      fbq.loaded = true;
      fbq.version = "2.0";
      fbq.queue = [];
      window.fbq = fbq;
      if (!window._fbq) {
        window._fbq = fbq;
      }
    }
    return window.fbq;
  }

  function apply(choice) {
    if (google) {
      gtag("consent", "update", consentSignals(choice));
    }
    if (window.fbq) {
      window.fbq("consent", choice.marketing ? "grant" : "revoke");
    }
    if (refused) {
      return;
    }
    if (choice.analytics && config.gtm && !loaded.gtm) {
      loaded.gtm = true;
      window.dataLayer.push({ "gtm.start": Date.now(), event: "gtm.js" });
      addScript(GOOGLE + "gtm.js?id=" + encodeURIComponent(config.gtm));
    }
    if (choice.analytics && config.ga4 && !loaded.ga4) {
      loaded.ga4 = true;
      gtag("js", new Date());
      gtag("config", config.ga4);
      addScript(GOOGLE + "gtag/js?id=" + encodeURIComponent(config.ga4));
    }
    if (choice.marketing && config.pixel && !loaded.pixel) {
      loaded.pixel = true;
      var fbq = pixelQueue();
      fbq("consent", "grant");
      fbq("init", config.pixel);
      fbq("track", "PageView");
      addScript(PIXEL);
    }
  }

  // -- the banner --------------------------------------------------------------------------

  var opener = document.getElementById("cookie-settings");
  var status = document.getElementById("consent-status");
  var title = document.getElementById("consent-title");
  var boxes = banner.querySelectorAll("input[name=purpose]");
  var reopened = false;

  function show(focus) {
    if (refused) {
      banner.querySelector("#consent-refused").hidden = false;
      banner.querySelector(".consent-refused-actions").hidden = false;
      var choices = banner.querySelector(".consent-choices");
      if (choices) {
        choices.hidden = true;
      }
      if (refused === "dnt") {
        banner.querySelector("[data-signal]").textContent = "Do Not Track";
      }
    }
    var current = readChoice();
    Array.prototype.forEach.call(boxes, function (box) {
      box.checked = Boolean(current && current[box.value]);
    });
    banner.hidden = false;
    reopened = focus;
    if (focus) {
      title.focus();
    }
  }

  function hide() {
    banner.hidden = true;
    if (reopened && opener) {
      opener.focus();
    }
    reopened = false;
  }

  function choose(choice) {
    storeChoice(choice);
    forgetTagCookies(choice);
    apply(choice);
    if (status) {
      status.textContent = refused
        ? "Analytics stay off: your browser asks not to be tracked."
        : choice.analytics || choice.marketing
          ? "Cookie choice saved: the analytics you allowed load from now on."
          : "Cookie choice saved: no analytics load.";
    }
    hide();
  }

  banner.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-consent]");
    if (!button) {
      return;
    }
    var action = button.getAttribute("data-consent");
    var all = action === "accept" && !refused;
    var choice = { analytics: all, marketing: all };
    if (action === "save" && !refused) {
      Array.prototype.forEach.call(boxes, function (box) {
        choice[box.value] = box.checked;
      });
    }
    choose(choice);
  });

  banner.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && reopened) {
      hide();
    }
  });

  if (opener) {
    opener.addEventListener("click", function (event) {
      event.preventDefault();
      show(true);
    });
  }

  var stored = readChoice();
  if (stored) {
    apply(refused ? { analytics: false, marketing: false } : stored);
  } else {
    show(false);
  }
})();
